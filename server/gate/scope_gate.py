"""The scope gate: does this prompt ask the edited relation, or something else about the subject?

A subject's block carries the new answer; applied to every prompt naming the subject, it would
also rewrite everything else the model knows about it. The gate opens an edit only when the
prompt (subject masked) is close to one of the subject's edit prompts, relative to how close
both are to generic questions about other relations (rule.py), in the space of the relation
head (relation_head.py). Its parts: the sentence encoder (encoder.py), the opening rule
(rule.py) and the per-fact table a pack stores (table.py); `ScopeGate` puts them together.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.editor.facts import is_question
from server.gate.encoder import SentenceEncoder
from server.gate.rule import (
    csls_scores,
    mask_subject,
    sentence_around,
    top_k_mean,
)
from server.gate.table import GateTable


class ScopeGate:
    def __init__(self, table: GateTable, encoder: SentenceEncoder) -> None:
        self.table = table
        self.encoder = encoder
        self.head = table.relation_head  # the pack's own, not necessarily the shipped one
        self.threshold = self.head.threshold
        self._prompts = self.head.project(table.prompt_embeddings)  # [F, E] relation space
        self._question_probes = self.head.project(table.question_probes)
        self._statement_probes = self.head.project(table.statement_probes)
        self._facts_of: dict[int, torch.Tensor] = {}
        for row in table.fact_rows.unique().tolist():
            self._facts_of[row] = (table.fact_rows == row).nonzero().flatten()

    @staticmethod
    def query(text: str, start: int, end: int, names: Sequence[str]) -> str:
        """What the encoder reads for a match: its sentence, the subject masked."""
        return mask_subject(sentence_around(text, start, end), names)

    def score(self, text: str, start: int, end: int, row: int, names: Sequence[str]) -> float:
        """The best score over the subject's facts; the edit applies when >= self.threshold."""
        facts = self._facts_of.get(row)
        if facts is None:
            return float("-inf")
        query = self.query(text, start, end, names)
        embedding = self.head.project(self.encoder.encode_one(query))  # [E]
        probes = self._question_probes if is_question(query) else self._statement_probes
        scores = csls_scores(
            self._prompts[facts] @ embedding,
            self.table.prompt_hubness[facts],
            top_k_mean(probes @ embedding),
            self.table.prompt_is_question[facts],
        )
        return float(scores.max())

    def opens(self, text: str, start: int, end: int, row: int, names: Sequence[str]) -> bool:
        return self.score(text, start, end, row, names) >= self.threshold
