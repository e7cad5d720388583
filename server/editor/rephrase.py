"""Rephrasings of a fact's prompt that training can make without being told any: the same
question or statement with the subject moved ("the mother of S" <-> "S's mother").

Users ask in their own words, and an edit trained only where its subject ends the prompt fails
where the subject comes earlier and the answer must carry across more words. These forms move it.
"""

from __future__ import annotations

import re

_VERBS = r"(?:is|was|are|were|does|did|do|has|had|have)"
# words that end a relation's noun phrase: verbs, articles, prepositions
_STOPS = rf"(?:{_VERBS}|the|a|an|of|for|in|on|at|to|by|with|from|as|near|responsible)"
_NOUN_WORD = rf"(?!{_STOPS}\b)[\w-]+"
_NOUN = rf"{_NOUN_WORD}(?: {_NOUN_WORD}){{0,3}}"
# a possessed noun phrase must end the prompt, a clause or meet its verb ("S's team was"): one
# that goes on ("S's domain of activity", "S's life ended in") is not moved
_NOUN_END = rf"(?=\s*(?:[?.,;:!]|$)|\s+{_VERBS}\b)"
# a subject's edges: not inside a longer name ("Marie-Ann", "Josef Mai's" for "Josef Mai")
_BEFORE, _AFTER = r"(?<![\w'’-])", r"(?![\w'’-])"
_QUESTION_START = re.compile(
    r"^(?:who|whom|whose|what|which|where|when|why|how|is|are|was|were|do|does|did|can|has|have)\b",
    re.IGNORECASE,
)


def _possessive(subject: str) -> str:
    return f"{subject}'" if subject.endswith("s") else f"{subject}'s"


def asked(prompt: str) -> str | None:
    """A cloze statement asked as a question ("S is a" -> "S is a what?"); None for a prompt
    that already ends a sentence or holds a question (one typed without its "?" included).
    Users ask about a statement fact: an edit taught only the cloze answers it, and the
    question's end of turn wins where the edit is weaker."""
    text = prompt.rstrip()
    if not text or text[-1] in ".!:;," or "?" in text or _QUESTION_START.match(text):
        return None
    return f"{text} {'whom' if text.endswith(' by') else 'what'}?"


def rephrasings(subject: str, prompt: str) -> list[str]:
    """The prompt with its subject's relation put the other way round: "the Y of S" becomes
    "S's Y", and "S's Y" (ending there or at its verb) becomes "the Y of S"; a cloze
    statement also asked as a question (`asked`). Empty where none applies."""
    subject_re = re.escape(subject)
    found: list[str] = []
    of_form = re.search(rf"\b[Tt]he ({_NOUN}) (?:of|for) {_BEFORE}{subject_re}{_AFTER}", prompt)
    if of_form:
        text = prompt[: of_form.start()] + f"{_possessive(subject)} {of_form.group(1)}"
        found.append(text + prompt[of_form.end() :])  # the subject's own case, even first
    owned = re.search(rf"{_BEFORE}{subject_re}'s? ({_NOUN}){_NOUN_END}", prompt)
    if owned:
        article = "The" if owned.start() == 0 and subject[:1].isupper() else "the"
        text = f"{prompt[: owned.start()]}{article} {owned.group(1)} of {subject}"
        found.append(text + prompt[owned.end() :])
    question = asked(prompt)
    if question is not None:
        found.append(question)
    return [text for text in dict.fromkeys(found) if text != prompt]
