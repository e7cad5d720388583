"""Rephrasings of a fact's prompt that training can make without being told any: the same
question or statement with the subject moved ("the mother of S" <-> "S's mother").

Users ask in their own words, and an edit trained only where its subject ends the prompt fails
where the subject comes earlier and the answer must carry across more words. These forms move it.
"""

from __future__ import annotations

import re

# words that end a relation's noun phrase: verbs, articles, prepositions
_STOPS = r"(?:is|was|are|were|does|did|do|has|had|have|the|a|an|of|for|in|on|at|to|by|with|from)"
_NOUN_WORD = rf"(?!{_STOPS}\b)[\w-]+"
_NOUN = rf"{_NOUN_WORD}(?: {_NOUN_WORD}){{0,3}}"


def _possessive(subject: str) -> str:
    return f"{subject}'" if subject.endswith("s") else f"{subject}'s"


def asked(prompt: str) -> str | None:
    """A cloze statement asked as a question ("S is a" -> "S is a what?"); None for a prompt
    that already ends a sentence. Users ask about a statement fact: an edit taught only the
    cloze answers it, and the question's end of turn wins where the edit is weaker."""
    text = prompt.rstrip()
    if not text or text[-1] in ".?!:;":
        return None
    return f"{text} {'whom' if text.endswith(' by') else 'what'}?"


def rephrasings(subject: str, prompt: str) -> list[str]:
    """The prompt with its subject's relation put the other way round: "the Y of S" becomes
    "S's Y" and "S's Y" becomes "the Y of S"; a cloze statement also asked as a question
    (`asked`). Empty where none applies."""
    subject_re = re.escape(subject)
    found: list[str] = []
    of_form = re.search(rf"\b([Tt])he ({_NOUN}) (?:of|for) {subject_re}\b", prompt)
    if of_form:
        text = prompt[: of_form.start()] + f"{_possessive(subject)} {of_form.group(2)}"
        found.append(text + prompt[of_form.end() :])  # the subject's own case, even first
    owned = re.search(rf"\b{subject_re}'s? ({_NOUN})", prompt)
    if owned:
        article = "The" if owned.start() == 0 and subject[:1].isupper() else "the"
        text = f"{prompt[: owned.start()]}{article} {owned.group(1)} of {subject}"
        found.append(text + prompt[owned.end() :])
    question = asked(prompt)
    if question is not None:
        found.append(question)
    return [text for text in dict.fromkeys(found) if text != prompt]
