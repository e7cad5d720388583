"""Applying trained edits: find a pack's subjects in a text, ask the gate, say which blocks to
write where.

Serving never runs the hypernetwork: the pack stores each subject's delta, so an edit costs a
detection, (only where a subject was found) one small encoder pass for the gate, a table lookup
and one in-place add in the hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from server.lks.detect import SubjectIndex, SubjectMatch, last_token_position
from server.lks.gate import GateTable, ScopeGate, SentenceEncoder
from server.lks.scope import EncodedText, encode, subject_index
from server.model.backbone import Backbone
from server.packs.errors import PackCorruptError
from server.packs.format import BLOCKS_KEY, Pack, SubjectEntry, check_compatible


@dataclass(frozen=True)
class PlannedEdit:
    layer: int
    position: int
    delta: torch.Tensor  # [H]
    label: str  # pack@version:subject, for the response's audit trail


@dataclass
class EditSet:
    """Subjects, their deltas at one layer, and the gate that scopes them."""

    subjects: Sequence[SubjectEntry]
    deltas: torch.Tensor  # [S, H]
    layer: int
    gate: ScopeGate | None = None
    ref: str = "unsaved"
    index: SubjectIndex = field(init=False)

    def __post_init__(self) -> None:
        self.index = subject_index(self.subjects)

    def allow(self, text: str, match: SubjectMatch) -> bool:
        if self.gate is None:
            return True
        entry = self.subjects[match.row]
        return self.gate.opens(
            text, match.start, match.end, match.row, (entry.subject, *entry.aliases)
        )

    def gate_queries(self, text: str) -> list[str]:
        """The encoder inputs planning `text` will need (only where a subject is found)."""
        if self.gate is None:
            return []
        queries = []
        for match in self.index.find(text):
            entry = self.subjects[match.row]
            names = (entry.subject, *entry.aliases)
            queries.append(self.gate.query(text, match.start, match.end, names))
        return queries

    def encode_all(
        self,
        tokenizer: PreTrainedTokenizerBase,
        pairs: Sequence[tuple[str, str | None]],
        chunk: int = 512,
    ) -> list[EncodedText]:
        """(context, target or None) pairs tokenised with this set's gated edits placed. The gate
        queries of each chunk go through the encoder as one batch: one pass per match would
        dominate an evaluation's text handling. A chunk's queries fit the encoder's memo."""
        encoded: list[EncodedText] = []
        for start in range(0, len(pairs), chunk):
            part = pairs[start : start + chunk]
            prime_gates([(context, [self]) for context, _ in part])
            encoded += [
                encode(tokenizer, self.index, context, target, allow=self.allow)
                for context, target in part
            ]
        return encoded

    def plan(self, text: str, offsets: Sequence[tuple[int, int]]) -> list[PlannedEdit]:
        return [
            PlannedEdit(
                self.layer,
                last_token_position(offsets, match.start, match.end),
                self.deltas[match.row],
                f"{self.ref}:{self.subjects[match.row].subject}",
            )
            for match in self.index.find(text)
            if self.allow(text, match)
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
        gate = ScopeGate(table, encoder)
    return EditSet(
        subjects=pack.content.subjects,
        deltas=pack.content.table[BLOCKS_KEY].to(backbone.device, backbone.dtype),
        layer=pack.manifest.layer,
        gate=gate,
        ref=pack.ref,
    )


def prime_gates(requests: Sequence[tuple[str, Sequence[EditSet]]]) -> None:
    """One batched encoder pass for the gate queries of several texts about to be planned."""
    by_encoder: dict[int, tuple[SentenceEncoder, list[str]]] = {}
    for text, edit_sets in requests:
        for edit_set in edit_sets:
            if edit_set.gate is not None:
                encoder = edit_set.gate.encoder
                by_encoder.setdefault(id(encoder), (encoder, []))[1].extend(
                    edit_set.gate_queries(text)
                )
    for encoder, queries in by_encoder.values():
        encoder.prime(queries)


def plan_for_sets(
    edit_sets: Sequence[EditSet], text: str, offsets: Sequence[tuple[int, int]]
) -> list[PlannedEdit]:
    """Edits of several packs on one text; the first pack listed wins a position two packs edit."""
    chosen: dict[tuple[int, int], PlannedEdit] = {}
    for edit_set in edit_sets:
        for edit in edit_set.plan(text, offsets):
            chosen.setdefault((edit.layer, edit.position), edit)
    return list(chosen.values())
