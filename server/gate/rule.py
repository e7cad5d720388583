"""The gate's opening rule: what text it reads and how it scores it.

The prompt (subject masked) must be close to one of the subject's edit prompts, relative to how
close both are to generic questions about other relations (a CSLS-style hubness correction), in
the space of the relation head (relation_head.py). Its constants and the head were fitted once
on zsRE and CounterFact dev items (bench/gate_research, tools/fit_relation_head.py) and hold for
every pack: users never choose a threshold.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from server.editor.facts import is_question

RULE = "csls-relation-head-v2"
PLACEHOLDER = "X"
TOP_K = 5
# Fitted on dev items only (bench/gate_research); the relation head was fitted with it in place.
# The threshold belongs to the head it was picked for (relation_head.py) and travels with packs.
STATEMENT_SHIFT = 0.055

# Generic prompts about other relations of a subject, in both styles (X = the subject).
QUESTION_PROBES = (
    "What is the occupation of X?", "What is X's profession?", "Where was X born?",
    "When was X born?", "Where did X die?", "When did X die?", "What is the nationality of X?",
    "What language does X speak?", "Who is the spouse of X?", "Who is the father of X?",
    "Who is the mother of X?", "Where did X study?", "Who is X's employer?", "What genre is X?",
    "What is the religion of X?", "Which political party does X belong to?",
    "What instrument does X play?", "What sport does X play?", "Which team does X play for?",
    "In which country is X located?", "What is the capital of X?", "Who founded X?",
    "When was X founded?", "Where is the headquarters of X?", "Who manufactured X?",
    "Who created X?", "What award did X receive?", "What is X named after?", "Who owns X?",
    "What is the population of X?",
)  # fmt: skip
STATEMENT_PROBES = (
    "The occupation of X is", "X works as a", "X was born in", "X was born on", "X died in",
    "X passed away on", "X is a citizen of", "X speaks the language", "X is married to",
    "The father of X is", "The mother of X is", "X studied at", "X is employed by",
    "The genre of X is", "The religion of X is", "X is a member of the political party",
    "X plays the instrument", "X plays the sport of", "X plays for the team",
    "X is located in the country of", "The capital of X is", "X was founded by",
    "X was founded in the year", "The headquarters of X is in", "X is manufactured by",
    "X was created by", "X received the award", "X is named after", "X is owned by",
    "The population of X is",
)  # fmt: skip


def mask_subject(text: str, names: Sequence[str]) -> str:
    for name in sorted(names, key=len, reverse=True):
        text = text.replace(name, PLACEHOLDER)
    return text


def masked_prompts(prompts: Sequence[str], subject_names: Sequence[Sequence[str]]) -> list[str]:
    """What the gate embeds for each fact: its prompt with the subject's names masked."""
    return [mask_subject(p, names) for p, names in zip(prompts, subject_names, strict=True)]


def answer_statement(masked_prompt: str, target: str) -> str | None:
    """A statement-style fact completed with its answer ("X is located in Rome"), a second gate
    row for the fact: the encoder was trained to match a question with the sentence that answers
    it, so "In which city is X?" finds it where it misses the cloze "X is located in". None for
    a question-style fact: its own prompt already meets questions (and the answered form cost
    shut rate on dev without raising recall; bench/gate_recall.py)."""
    if is_question(masked_prompt) or not target.strip():
        return None
    return f"{masked_prompt.rstrip()} {target.strip()}"


def gate_rows(
    prompts: Sequence[str],
    subject_names: Sequence[Sequence[str]],
    targets: Sequence[str] | None = None,
) -> tuple[list[str], list[int]]:
    """What a gate table embeds, and the fact each row belongs to: every fact's masked prompt
    (rows 0..F-1, in fact order), then, with `targets`, each statement-style fact's answered
    form (`answer_statement`). A fact's rows share its subject row; the gate takes the best."""
    texts = masked_prompts(prompts, subject_names)
    facts = list(range(len(texts)))
    if targets is not None:
        for fact, (masked, target) in enumerate(zip(list(texts), targets, strict=True)):
            answered = answer_statement(masked, target)
            if answered is not None:
                texts.append(answered)
                facts.append(fact)
    return texts, facts


# Chat-template markers such as <|im_end|>, </s>, <s>, [INST]: not part of what the user asked.
_TEMPLATE_MARKERS = re.compile(r"<\|[^<>|\s]{1,40}\|>|</?s>|\[/?INST\]")


def line_span(text: str, start: int, end: int) -> tuple[int, int]:
    """Where the line holding the span [start, end) starts and ends."""
    line_end = text.find("\n", end)
    return text.rfind("\n", 0, start) + 1, line_end if line_end >= 0 else len(text)


def sentence_around(text: str, start: int, end: int) -> str:
    """The line that holds a match, without template markers: the question a chat template or a
    prefix wraps."""
    line_start, line_end = line_span(text, start, end)
    return _TEMPLATE_MARKERS.sub(" ", text[line_start:line_end]).strip()


def top_k_mean(similarities: torch.Tensor) -> torch.Tensor:
    return similarities.topk(min(TOP_K, similarities.shape[-1]), dim=-1).values.mean(-1)


def hubness(
    embeddings: torch.Tensor,  # [N, E]
    is_q: torch.Tensor,  # [N] bool
    question_probes: torch.Tensor,  # [P, E]
    statement_probes: torch.Tensor,  # [P, E]
) -> torch.Tensor:
    """[N]: how close each text sits to generic questions (or statements, by its style) about
    other relations; CSLS subtracts it so that texts near everything do not open every gate."""
    return torch.where(
        is_q,
        top_k_mean(embeddings @ question_probes.T),
        top_k_mean(embeddings @ statement_probes.T),
    )


def csls_scores(
    similarity: torch.Tensor,  # [...]: cosine of edit prompt and query, relation space
    prompt_hubness: torch.Tensor,  # broadcastable to similarity
    query_hubness: torch.Tensor,
    prompt_is_q: torch.Tensor,  # bool, broadcastable
) -> torch.Tensor:
    """The gate's score; a statement-style edit prompt gets STATEMENT_SHIFT (statements score
    lower than questions against each other)."""
    shift = STATEMENT_SHIFT * (~prompt_is_q).to(similarity.dtype)
    return similarity - 0.5 * (prompt_hubness + query_hubness) + shift
