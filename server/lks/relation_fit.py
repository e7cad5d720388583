"""Fitting the gate's relation head: edit prompts against their paraphrases (the gate should
open) and against other questions about the same subject (it should stay shut), all with the
subject masked, scored exactly as the gate scores them (CSLS in the head's space)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.lks.gate import (
    QUESTION_PROBES,
    STATEMENT_PROBES,
    SentenceEncoder,
    csls_scores,
    hubness,
    is_question,
    mask_subject,
)
from server.lks.relation_head import RelationHead


@dataclass(frozen=True)
class RelationExample:
    subject: str
    prompt: str  # the edit prompt
    paraphrase: str  # asks the same relation
    other: str  # asks something else about the same subject


@dataclass(frozen=True)
class RelationPairs:
    """Encoded examples (encoder space, subject masked)."""

    prompts: torch.Tensor  # [N, E]
    paraphrases: torch.Tensor  # [N, E]
    others: torch.Tensor  # [N, E]
    prompt_is_q: torch.Tensor  # [N] bool
    paraphrase_is_q: torch.Tensor  # [N] bool
    other_is_q: torch.Tensor  # [N] bool

    def __len__(self) -> int:
        return self.prompts.shape[0]

    @classmethod
    def encode(cls, encoder: SentenceEncoder, examples: Sequence[RelationExample]) -> RelationPairs:
        columns = []
        for get in (lambda e: e.prompt, lambda e: e.paraphrase, lambda e: e.other):
            columns.append([mask_subject(get(e), [e.subject]) for e in examples])
        styles = [torch.tensor([is_question(t) for t in c], dtype=torch.bool) for c in columns]
        # clone: the encoder returns inference-mode tensors, which autograd cannot save
        return cls(*(encoder.encode(c).clone() for c in columns), *styles)

    def subset(self, rows: torch.Tensor) -> RelationPairs:
        return RelationPairs(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))


@dataclass(frozen=True)
class Probes:
    questions: torch.Tensor  # [P, E] encoder space
    statements: torch.Tensor  # [P, E]

    @classmethod
    def encode(cls, encoder: SentenceEncoder) -> Probes:
        return cls(
            encoder.encode(QUESTION_PROBES).clone(), encoder.encode(STATEMENT_PROBES).clone()
        )


def pair_scores(
    weight: torch.Tensor, pairs: RelationPairs, probes: Probes
) -> tuple[torch.Tensor, torch.Tensor]:
    """([N] paraphrase scores, [N] other-question scores) as the gate computes them."""
    head = RelationHead(weight, threshold=0.0)
    prompts, paraphrases, others = (
        head.project(x) for x in (pairs.prompts, pairs.paraphrases, pairs.others)
    )
    questions, statements = head.project(probes.questions), head.project(probes.statements)
    prompt_hubness = hubness(prompts, pairs.prompt_is_q, questions, statements)

    def score(queries: torch.Tensor, query_is_q: torch.Tensor) -> torch.Tensor:
        query_hubness = hubness(queries, query_is_q, questions, statements)
        similarity = (prompts * queries).sum(-1)
        return csls_scores(similarity, prompt_hubness, query_hubness, pairs.prompt_is_q)

    return score(paraphrases, pairs.paraphrase_is_q), score(others, pairs.other_is_q)


def fit_relation_head(
    pair_sets: Sequence[RelationPairs],
    probes: Probes,
    *,
    steps: int = 3000,
    batch_size: int = 256,
    identity_weight: float = 1.0,
    lr: float = 3e-3,
    seed: int = 0,
) -> torch.Tensor:
    """The head's weight [E, E], from the identity: binary cross-entropy on the gate's own score
    (paraphrase -> open, other question -> shut) with a learned threshold and scale, each set
    sampled equally per step (so a large dataset does not drown a small one), and an L2 pull
    to the identity (`identity_weight`) so that what the encoder knew is kept."""
    assert pair_sets and all(len(p) > 0 for p in pair_sets), "every pair set needs examples"
    dim = pair_sets[0].prompts.shape[1]
    generator = torch.Generator().manual_seed(seed)
    eye = torch.eye(dim)
    weight = eye.clone().requires_grad_(True)
    offset = torch.zeros((), requires_grad=True)
    scale = torch.tensor(20.0, requires_grad=True)
    optimizer = torch.optim.Adam([weight, offset, scale], lr=lr)
    for _ in range(steps):
        loss = identity_weight * ((weight - eye) ** 2).sum() / dim
        for pairs in pair_sets:
            rows = torch.randint(0, len(pairs), (batch_size,), generator=generator)
            positive, negative = pair_scores(weight, pairs.subset(rows), probes)
            loss = loss + F.binary_cross_entropy_with_logits(
                scale * (positive - offset), torch.ones_like(positive)
            )
            loss = loss + F.binary_cross_entropy_with_logits(
                scale * (negative - offset), torch.zeros_like(negative)
            )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return weight.detach()


def balanced_threshold(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """The threshold with the best balanced accuracy (open on positives, shut on negatives)."""
    candidates = torch.cat([positive, negative]).unique()
    opened = (positive[None, :] >= candidates[:, None]).float().mean(1)
    shut = (negative[None, :] < candidates[:, None]).float().mean(1)
    return float(candidates[(opened + shut).argmax()])


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    return float((positive[:, None] > negative[None, :]).float().mean())
