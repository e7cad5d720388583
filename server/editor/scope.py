"""The edit scope: facts -> subjects (table rows), their names for detection, their feature text,
and the tokenised sequences the editor trains and evaluates on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from server.editor.detect import SubjectIndex, SubjectMatch, last_token_position
from server.editor.facts import Fact


@dataclass(frozen=True)
class SubjectEntry:
    """One subject row: its name and aliases (what a pack's subjects file lists)."""

    subject: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scope:
    subjects: list[SubjectEntry]
    feature_texts: list[str]
    fact_rows: list[int]  # fact index -> subject row

    @classmethod
    def from_facts(cls, facts: Sequence[Fact]) -> Scope:
        rows: dict[str, int] = {}
        aliases: list[list[str]] = []
        features: list[list[str]] = []
        fact_rows = []
        for fact in facts:
            row = rows.setdefault(fact.subject, len(rows))
            if row == len(aliases):
                aliases.append([])
                features.append([])
            aliases[row].extend(a for a in fact.aliases if a not in aliases[row])
            features[row].append(f"{fact.prompt} {fact.target}")
            fact_rows.append(row)
        subjects = [SubjectEntry(s, tuple(aliases[r])) for s, r in rows.items()]
        return cls(subjects, [" ".join(parts) for parts in features], fact_rows)

    def index(self, *, case_insensitive: bool = False) -> SubjectIndex:
        return subject_index(self.subjects, case_insensitive=case_insensitive)

    def fact_names(self) -> list[tuple[str, ...]]:
        """Each fact's subject names (the subject and its aliases): what the gate masks."""
        names = [(s.subject, *s.aliases) for s in self.subjects]
        return [names[row] for row in self.fact_rows]


def subject_index(
    subjects: Sequence[SubjectEntry], *, case_insensitive: bool = False
) -> SubjectIndex:
    names = [(name, row) for row, s in enumerate(subjects) for name in (s.subject, *s.aliases)]
    return SubjectIndex(names, case_insensitive=case_insensitive)


@dataclass(frozen=True)
class EncodedText:
    """A tokenised text with the edits that apply to it and (optionally) target positions."""

    ids: list[int]
    edits: list[tuple[int, int]]  # (subject row, token position)
    target_ids: list[int]  # tokens to predict, teacher-forced
    predict_at: list[int]  # position whose output predicts each target token

    @property
    def first_edit(self) -> int:
        """The first edited position: everything before it is the unedited model's, so
        training computes it once and a step runs from here on."""
        return min(position for _, position in self.edits)


def join_target(context: str, target: str) -> str:
    """The text a target makes after its context (one space between, unless there is one)."""
    joiner = "" if not context or context[-1].isspace() else " "
    return context + joiner + target


def encode(
    tokenizer: PreTrainedTokenizerBase,
    index: SubjectIndex,
    context: str,
    target: str | None = None,
    *,
    templated: bool = False,
    allow: Callable[[str, SubjectMatch], bool] | None = None,
) -> EncodedText:
    """Tokenise `context` (+ the target as it follows it) and place the subjects it names.

    Target ids come from the target as it follows the context, never from the target alone:
    Llama and GPT-2 tokenizers fold the leading space into the next token.
    """
    text = context if target is None else join_target(context, target)
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=not templated)
    ids: list[int] = encoded["input_ids"]
    offsets: list[tuple[int, int]] = [tuple(o) for o in encoded["offset_mapping"]]
    edits = [
        (m.row, last_token_position(offsets, m.start, m.end))
        for m in index.find(context)
        if allow is None or allow(context, m)
    ]
    target_ids: list[int] = []
    predict_at: list[int] = []
    if target is not None:
        # special tokens (BOS) have (0, 0) offsets and are never predicted
        first = next(
            (i for i, (s, e) in enumerate(offsets) if s >= len(context) and e > s), len(ids)
        )
        assert first > 0, f"no context token before the target in {text!r}"
        target_ids = ids[first:]
        predict_at = list(range(first - 1, len(ids) - 1))
        assert target_ids, f"target {target!r} produced no tokens after {context!r}"
    return EncodedText(ids, edits, target_ids, predict_at)


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """How many first tokens every row shares, leaving each row at least one of its own (the
    pass after the shared one must read a token)."""
    length = min(len(row) for row in rows) - 1
    first = rows[0]
    for row in rows[1:]:
        length = next((k for k in range(length) if row[k] != first[k]), length)
    return max(length, 0)


def shared_prefix_groups(
    sequences: Sequence[EncodedText],
    cuts: Sequence[int],
    *,
    key_tokens: int = 8,
    min_group: int = 16,
) -> list[tuple[int, list[int]]]:
    """(prefix length, sequence indices) groups whose members all start with the same tokens
    before their first edit, such as every chat-template form of a fact set (about 30 tokens of
    system header on the default model). A group's prefix runs once; length 0 means no sharing."""
    buckets: dict[tuple[int, ...], list[int]] = {}
    for index, seq in enumerate(sequences):
        if cuts[index] >= key_tokens:
            buckets.setdefault(tuple(seq.ids[:key_tokens]), []).append(index)
    groups: list[tuple[int, list[int]]] = []
    grouped: set[int] = set()
    for members in buckets.values():
        if len(members) < min_group:
            continue
        length = min(
            min(cuts[i] for i in members), common_prefix([sequences[i].ids for i in members])
        )
        if length >= key_tokens:
            groups.append((length, members))
            grouped.update(members)
    rest = [i for i in range(len(sequences)) if i not in grouped]
    return ([(0, rest)] if rest else []) + groups


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar lengths: padding a 15-token prompt to a 50-token chat form
    would triple the work of a pass."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def pad_batch(
    sequences: Sequence[EncodedText], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask: positions stay where `encode` put them."""
    width = max(len(s.ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq.ids)] = torch.tensor(seq.ids)
        mask[row, : len(seq.ids)] = 1
    return ids.to(device), mask.to(device)
