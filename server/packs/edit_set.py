"""Applying trained edits: find a pack's subjects in a text, ask the gate, say which blocks to
write where.

Serving never runs the hypernetwork: the pack stores each subject's delta, so an edit costs a
detection, (only where a subject was found) one small encoder pass for the gate, a table lookup
and one in-place add in the hook.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from server.editor.detect import SubjectIndex, SubjectMatch, TokenPositions
from server.editor.facts import is_question
from server.editor.scope import EncodedText, encode, subject_index
from server.gate.encoder import SentenceEncoder
from server.gate.scope_gate import ScopeGate
from server.gate.table import GateTable
from server.model.backbone import Backbone
from server.packs.errors import PackCorruptError, PackIncompatibleError
from server.packs.format import BLOCKS_KEY, Pack, SubjectEntry, check_compatible


@dataclass(frozen=True)
class PlannedEdit:
    layer: int
    position: int
    delta: torch.Tensor  # [H]
    label: str  # pack@version:subject, for the response's audit trail
    targets: tuple[str, ...] = ()  # said in a completion, the edit is released (release_targets)


@dataclass
class EditSet:
    """Subjects, their deltas at one layer, the gate that scopes them, and each subject's
    release targets (`release_targets`: a completion that says one releases the edit)."""

    subjects: Sequence[SubjectEntry]
    deltas: torch.Tensor  # [S, H]
    layer: int
    gate: ScopeGate | None = None
    ref: str = "unsaved"
    targets: Sequence[tuple[str, ...]] = ()  # per subject row, or empty
    index: SubjectIndex = field(init=False)

    def __post_init__(self) -> None:
        if self.targets and len(self.targets) != len(self.subjects):
            raise ValueError(f"{len(self.targets)} target lists for {len(self.subjects)} subjects")
        self.index = subject_index(self.subjects)

    def subject_targets(self, row: int) -> tuple[str, ...]:
        return tuple(self.targets[row]) if self.targets else ()

    def allow(self, text: str, match: SubjectMatch) -> bool:
        if self.gate is None:
            return True
        entry = self.subjects[match.row]
        return self.gate.opens(
            text, match.start, match.end, match.row, (entry.subject, *entry.aliases)
        )

    def gate_queries(self, text: str, matches: Sequence[SubjectMatch] | None = None) -> list[str]:
        """The encoder inputs planning `text` will need: one per distinct line and subject
        (a subject named a thousand times on one line is one query)."""
        if self.gate is None:
            return []
        found = self.index.find(text) if matches is None else matches
        return [
            self.gate.query(text, match.start, match.end, self._names(match.row))
            for match in _first_per_line(text, found).values()
        ]

    def _names(self, row: int) -> tuple[str, ...]:
        entry = self.subjects[row]
        return (entry.subject, *entry.aliases)

    def encode_all(
        self,
        tokenizer: PreTrainedTokenizerBase,
        pairs: Sequence[tuple[str, str | None]],
        chunk: int = 512,
        *,
        templated: Sequence[bool] | None = None,
    ) -> list[EncodedText]:
        """(context, target or None) pairs tokenised with this set's gated edits placed. The gate
        queries of each chunk go through the encoder as one batch: one pass per match would
        dominate an evaluation's text handling. A chunk's queries fit the encoder's memo.
        `templated[i]`: context i is a rendered chat, which carries its special tokens."""
        flags = list(templated) if templated is not None else [False] * len(pairs)
        assert len(flags) == len(pairs), "one templated flag per pair"
        encoded: list[EncodedText] = []
        for start in range(0, len(pairs), chunk):
            part = pairs[start : start + chunk]
            prime_gates([(context, [self]) for context, _ in part])
            encoded += [
                encode(tokenizer, self.index, context, target, templated=flag, allow=self.allow)
                for (context, target), flag in zip(part, flags[start : start + chunk], strict=True)
            ]
        return encoded

    def plan(
        self,
        text: str,
        positions: TokenPositions,
        matches: Sequence[SubjectMatch] | None = None,
    ) -> list[PlannedEdit]:
        """The edits for `text` (its `matches`, if already found). The gate reads a match's
        line, so it decides once per distinct line and subject: the cost grows with the lines,
        not with how often a subject repeats."""
        found = self.index.find(text) if matches is None else matches
        keys = _line_keys(text, found)
        opens: dict[LineKey, bool] = {}
        for key, match in zip(keys, found, strict=True):
            if key not in opens:
                opens[key] = self.allow(text, match)
        return [
            PlannedEdit(
                self.layer,
                positions.last_token(match.start, match.end),
                self.deltas[match.row],
                f"{self.ref}:{self.subjects[match.row].subject}",
                self.subject_targets(match.row),
            )
            for key, match in zip(keys, found, strict=True)
            if opens[key]
        ]


def load_edit_set(pack: Pack, backbone: Backbone, encoder: SentenceEncoder | None) -> EditSet:
    """A validated pack, checked against the backbone, ready to plan edits."""
    check_compatible(
        pack.manifest,
        fingerprint=backbone.fingerprint,
        hidden_size=backbone.hidden_size,
        num_layers=backbone.num_layers,
    )
    try:
        table = GateTable.from_tensors(pack.content.table)
    except ValueError as exc:
        raise PackCorruptError(f"pack {pack.ref}: {exc}") from None
    gate = None
    if table is not None:
        if encoder is None:
            raise ValueError(f"pack {pack.ref} has a scope gate; load the sentence encoder")
        width = table.prompt_embeddings.shape[1]
        if width != encoder.dim:
            raise PackIncompatibleError(
                f"pack {pack.ref}: its scope gate holds {width}-wide embeddings, this server's "
                f"sentence encoder gives {encoder.dim}; retrain the pack with this encoder"
            )
        gate = ScopeGate(table, encoder)
    blocks = pack.content.table[BLOCKS_KEY]
    deltas = blocks.to(backbone.device, backbone.dtype)
    if not torch.isfinite(deltas).all():  # finite on disk (read_pack), but too big for the dtype
        raise PackIncompatibleError(
            f"pack {pack.ref}: its blocks (largest |value| {float(blocks.abs().max()):.3g}) "
            f"overflow the backbone's {str(backbone.dtype).removeprefix('torch.')}; "
            "serve the backbone in float32 or bfloat16, or retrain the pack"
        )
    facts = pack.content.facts
    return EditSet(
        subjects=pack.content.subjects,
        deltas=deltas,
        layer=pack.manifest.layer,
        gate=gate,
        ref=pack.ref,
        targets=release_targets(
            pack.content.subjects,
            [(f.get("subject"), f.get("prompt"), f.get("target")) for f in facts],
        ),
    )


def release_targets(
    subjects: Sequence[SubjectEntry], facts: Sequence[tuple[object, object, object]]
) -> list[tuple[str, ...]]:
    """Each subject row's release targets, from (subject, prompt, target) of its facts: the
    targets of its statements ("Hamlet was written by"). Training teaches no end after a
    statement's answer in a bare completion (the model goes on there), so served, such an edit
    is released once a completion says its target; a question's edit is taught to end. A fact
    whose fields are not strings (a hand-edited facts file) is skipped."""
    by_subject: dict[str, list[str]] = {}
    for subject, prompt, target in facts:
        if not (isinstance(subject, str) and isinstance(prompt, str) and isinstance(target, str)):
            continue
        if not is_question(prompt):
            targets = by_subject.setdefault(subject, [])
            if target not in targets:
                targets.append(target)
    return [tuple(by_subject.get(entry.subject, ())) for entry in subjects]


LineKey = tuple[int, int, int]  # (first line, last line, subject row) of a match


def _line_keys(text: str, matches: Sequence[SubjectMatch]) -> list[LineKey]:
    """What each match's gate decision depends on: the lines it spans and its subject. One scan
    for newlines and a bisection per match, whatever the text's length."""
    newlines = [m.start() for m in re.finditer("\n", text)] if len(matches) > 1 else []
    return [
        (bisect.bisect(newlines, m.start), bisect.bisect(newlines, m.end), m.row) for m in matches
    ]


def _first_per_line(text: str, matches: Sequence[SubjectMatch]) -> dict[LineKey, SubjectMatch]:
    firsts: dict[LineKey, SubjectMatch] = {}
    for key, match in zip(_line_keys(text, matches), matches, strict=True):
        firsts.setdefault(key, match)
    return firsts


def prime_gates(requests: Sequence[tuple[str, Sequence[EditSet]]]) -> None:
    """One batched encoder pass for the gate queries of several texts about to be planned."""
    _prime([(edit_set, text, None) for text, edit_sets in requests for edit_set in edit_sets])


def _prime(items: Sequence[tuple[EditSet, str, Sequence[SubjectMatch] | None]]) -> None:
    """Encode the gate queries of (edit set, text, its matches if found) items, one batch per
    encoder."""
    by_encoder: dict[int, tuple[SentenceEncoder, list[str]]] = {}
    for edit_set, text, matches in items:
        if edit_set.gate is not None:
            encoder = edit_set.gate.encoder
            queries = edit_set.gate_queries(text, matches)
            by_encoder.setdefault(id(encoder), (encoder, []))[1].extend(queries)
    for encoder, queries in by_encoder.values():
        encoder.prime(queries)


class TooManySubjectMatchesError(ValueError):
    """A text names edited subjects more often than a request may."""


def plan_edits(
    edit_sets: Sequence[EditSet],
    text: str,
    offsets: Sequence[tuple[int, int]],
    *,
    max_matches: int | None = None,
) -> list[PlannedEdit]:
    """Edits of several packs on one tokenised text: each pack's subjects found once, the
    count checked against `max_matches`, every gate query of the text encoded in one batch,
    then planned. The first pack listed wins a position two packs edit."""
    found = [edit_set.index.find(text) for edit_set in edit_sets]
    total = sum(len(matches) for matches in found)
    if max_matches is not None and total > max_matches:
        raise TooManySubjectMatchesError(
            f"the prompt names edited subjects {total} times; a request may name them at most "
            f"{max_matches} times (LKS_MAX_SUBJECT_MATCHES)"
        )
    _prime([(edit_set, text, matches) for edit_set, matches in zip(edit_sets, found, strict=True)])
    positions = TokenPositions(offsets)
    chosen: dict[tuple[int, int], PlannedEdit] = {}
    for edit_set, matches in zip(edit_sets, found, strict=True):
        for edit in edit_set.plan(text, positions, matches):
            chosen.setdefault((edit.layer, edit.position), edit)
    return list(chosen.values())
