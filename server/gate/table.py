"""The gate table: what a pack stores of its gate (per fact: the masked prompt's embedding,
subject row, hubness and style; the relation head and threshold it was calibrated with), how it
is built from the facts, and the checks a loaded one must pass before it can be scored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from server.editor.facts import is_question
from server.gate.encoder import SentenceEncoder
from server.gate.relation_head import RelationHead
from server.gate.rule import (
    QUESTION_PROBES,
    STATEMENT_PROBES,
    gate_rows,
    hubness,
)


@dataclass
class GateTable:
    """Per row: a masked prompt's embedding (encoder space, so a later version can reuse it
    whatever head it uses), subject row, hubness r_p (relation space) and style; the relation
    head and threshold the table was calibrated with. Rows 0..F-1 are the facts' prompts; a
    statement-style fact may add a row after them, its prompt with the answer (rule.gate_rows),
    with the same subject row: F below counts rows, not facts."""

    prompt_embeddings: torch.Tensor  # [F, E]
    fact_rows: torch.Tensor  # [F] long: subject row of each fact
    prompt_hubness: torch.Tensor  # [F]
    prompt_is_question: torch.Tensor  # [F] bool
    question_probes: torch.Tensor  # [P, E] encoder space
    statement_probes: torch.Tensor  # [P, E] encoder space
    head: torch.Tensor  # [E, E] relation head weight
    threshold: torch.Tensor  # [] the gate opens at score >= threshold

    TENSOR_KEYS = (
        "prompt_embeddings",
        "fact_rows",
        "prompt_hubness",
        "prompt_is_question",
        "question_probes",
        "statement_probes",
    )
    HEAD_KEYS = ("head", "threshold")  # absent from packs built before the relation head

    @property
    def relation_head(self) -> RelationHead:
        return RelationHead(self.head, float(self.threshold))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f"gate.{k}": getattr(self, k) for k in self.TENSOR_KEYS + self.HEAD_KEYS}

    @classmethod
    def in_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Whether a pack's table holds a gate (packs without one edit on every match)."""
        return all(f"gate.{k}" in tensors for k in cls.TENSOR_KEYS)

    @classmethod
    def check_tensors(cls, tensors: Mapping[str, torch.Tensor], subject_count: int) -> None:
        """Refuse (ValueError) a gate whose tensors disagree in shape, dtype or rows: scoring it
        would fail inside a request, or a partial gate would silently edit every match."""
        present = [k for k in cls.TENSOR_KEYS + cls.HEAD_KEYS if f"gate.{k}" in tensors]
        if not present:
            return
        missing = [f"gate.{k}" for k in cls.TENSOR_KEYS if k not in present]
        if missing:
            raise ValueError(f"incomplete scope gate: {', '.join(missing)} missing")
        if ("head" in present) != ("threshold" in present):
            raise ValueError("gate.head and gate.threshold come together; one is missing")
        embeddings = tensors["gate.prompt_embeddings"]
        if embeddings.ndim != 2:
            raise ValueError(
                f"gate.prompt_embeddings must be [facts, width]; got {tuple(embeddings.shape)}"
            )
        facts, dim = embeddings.shape
        expected = {
            "prompt_embeddings": ((facts, dim), "float"),
            "fact_rows": ((facts,), "int"),
            "prompt_hubness": ((facts,), "float"),
            "prompt_is_question": ((facts,), "bool"),
            "head": ((dim, dim), "float"),
        }
        for key, (shape, kind) in expected.items():
            tensor = tensors.get(f"gate.{key}")
            if tensor is None:  # a gate built before the relation head has none
                continue
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"gate.{key} must be {list(shape)} (gate.prompt_embeddings is "
                    f"[{facts}, {dim}]); got {list(tensor.shape)}"
                )
            _check_kind(f"gate.{key}", tensor, kind)
        threshold = tensors.get("gate.threshold")
        if threshold is not None:
            if threshold.numel() != 1:
                raise ValueError(f"gate.threshold must be one number; got {list(threshold.shape)}")
            _check_kind("gate.threshold", threshold, "float")
        for key in ("question_probes", "statement_probes"):
            probes = tensors[f"gate.{key}"]
            if probes.ndim != 2 or probes.shape[0] < 1 or probes.shape[1] != dim:
                raise ValueError(
                    f"gate.{key} must be [probes >= 1, {dim}]; got {list(probes.shape)}"
                )
            _check_kind(f"gate.{key}", probes, "float")
        rows = tensors["gate.fact_rows"]
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= subject_count):
            raise ValueError(
                f"gate.fact_rows holds rows {int(rows.min())}..{int(rows.max())}, "
                f"outside the {subject_count} subjects of the table"
            )

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> GateTable | None:
        """None without a gate; ValueError for a head that cannot score this table."""
        if not cls.in_tensors(tensors):
            return None
        fields = {k: tensors[f"gate.{k}"] for k in cls.TENSOR_KEYS}
        if all(f"gate.{k}" in tensors for k in cls.HEAD_KEYS):
            fields.update({k: tensors[f"gate.{k}"] for k in cls.HEAD_KEYS})
            dim = fields["prompt_embeddings"].shape[1]
            if fields["head"].shape != (dim, dim) or fields["threshold"].numel() != 1:
                raise ValueError(
                    f"gate.head must be [{dim}, {dim}] and gate.threshold one number; got "
                    f"{tuple(fields['head'].shape)} and {tuple(fields['threshold'].shape)}"
                )
        else:  # built before the relation head: scored as it was calibrated, raw embeddings
            identity = RelationHead.identity(fields["prompt_embeddings"].shape[1])
            fields.update(head=identity.weight, threshold=torch.tensor(identity.threshold))
        return cls(**fields)

    @classmethod
    def build(
        cls,
        encoder: SentenceEncoder,
        prompts: Sequence[str],
        subject_names: Sequence[Sequence[str]],
        fact_rows: Sequence[int],
        known: Mapping[str, torch.Tensor] | None = None,
        targets: Sequence[str] | None = None,
    ) -> GateTable:
        """`known`: masked prompt (or answered form) -> embedding from an earlier version, not
        encoded again. `targets`: each fact's answer; with them a statement-style fact gets a
        second row, its prompt completed with the answer (rule.gate_rows), which opens the gate
        for questions that ask it. Without them, one row per fact (tables before answer rows)."""
        masked, facts = gate_rows(prompts, subject_names, targets)
        subject_rows = list(fact_rows)
        if targets is not None:
            subject_rows = [subject_rows[fact] for fact in facts]
        known = known or {}
        missing = list(dict.fromkeys(m for m in masked if m not in known))
        fresh = dict(zip(missing, encoder.encode(missing), strict=True)) if missing else {}
        embeddings = (
            torch.stack([known[m] if m in known else fresh[m] for m in masked])
            if masked
            else encoder.encode([])
        )
        questions = encoder.encode(QUESTION_PROBES)
        statements = encoder.encode(STATEMENT_PROBES)
        is_q = torch.tensor([is_question(m) for m in masked], dtype=torch.bool)
        head = encoder.relation_head
        prompt_hubness = hubness(
            head.project(embeddings), is_q, head.project(questions), head.project(statements)
        )
        return cls(
            embeddings,
            torch.tensor(subject_rows, dtype=torch.long),
            prompt_hubness,
            is_q,
            questions,
            statements,
            head.weight.clone(),
            torch.tensor(head.threshold, dtype=torch.float32),
        )


_KINDS = {  # what check_tensors calls each kind of gate tensor, for its messages
    "float": "a floating-point",
    "int": "an int32 or int64",
    "bool": "a bool",
}


def _check_kind(key: str, tensor: torch.Tensor, kind: str) -> None:
    """The gate's arithmetic needs these dtypes: `~` on is_question, indexing by fact_rows."""
    ok = {
        "float": tensor.is_floating_point(),
        "int": tensor.dtype in (torch.int32, torch.int64),
        "bool": tensor.dtype == torch.bool,
    }[kind]
    if not ok:
        raise ValueError(f"{key} must be {_KINDS[kind]} tensor; got {tensor.dtype}")
