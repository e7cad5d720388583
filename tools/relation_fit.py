"""Fitting the gate's relation head: edit prompts against their paraphrases (the gate should
open) and against other questions about the same subject (it should stay shut), all with the
subject masked, scored exactly as the gate scores them (CSLS in the head's space)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from server.gate.encoder import SentenceEncoder
from server.gate.relation_head import RelationHead
from server.gate.rule import (
    PLACEHOLDER,
    QUESTION_PROBES,
    STATEMENT_PROBES,
    csls_scores,
    hubness,
    is_question,
    mask_subject,
)


@dataclass(frozen=True)
class RelationExample:
    subject: str
    prompt: str  # the edit prompt
    paraphrase: str  # asks the same relation
    other: str  # asks something else about the same subject


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, item: str) -> str:
        self.parent.setdefault(item, item)
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _target_cosine(a: Counter[str], b: Counter[str]) -> float:
    dot = sum(count * b[target] for target, count in a.items() if target in b)
    return dot / math.sqrt(sum(v * v for v in a.values()) * sum(v * v for v in b.values()))


def relation_groups(
    examples: Sequence[RelationExample],
    targets: Sequence[str],
    encoder: SentenceEncoder,
    *,
    target_overlap: float = 0.5,
    same_wording: float = 0.9,
) -> dict[str, int]:
    """Masked prompt template -> relation group, without relation labels: an edit prompt and
    its paraphrase ask the same relation (linked); groups whose targets look alike
    (`target_overlap`, cosine of target counts) or with two near-identical wordings
    (`same_wording`, encoder cosine) are merged. Merging errs towards one group: a relation
    split in two would make its own paraphrases negatives, a merge only loses some."""
    prompts = [mask_subject(e.prompt, [e.subject]) for e in examples]
    links = _UnionFind()
    for example, prompt in zip(examples, prompts, strict=True):
        links.find(prompt)
        if example.paraphrase:
            links.union(prompt, mask_subject(example.paraphrase, [example.subject]))
    target_counts: dict[str, Counter[str]] = defaultdict(Counter)
    for prompt, target in zip(prompts, targets, strict=True):
        target_counts[links.find(prompt)][target] += 1
    roots = list(target_counts)
    for i, a in enumerate(roots):
        for b in roots[i + 1 :]:
            if _target_cosine(target_counts[a], target_counts[b]) > target_overlap:
                links.union(a, b)
    names = sorted(set(prompts))
    with torch.no_grad():
        embeddings = encoder.encode(names)
    close = (embeddings @ embeddings.T) > same_wording
    for i, j in close.nonzero().tolist():
        if i < j:
            links.union(names[i], names[j])
    group_ids: dict[str, int] = {}
    return {name: group_ids.setdefault(links.find(name), len(group_ids)) for name in names}


# words whose loss leaves the relation a template asks: only content words are dropped
# fmt: off
FUNCTION_WORDS = frozenset({
    "a", "an", "the", "of", "in", "on", "at", "to", "for", "by", "from", "with", "as", "and",
    "or", "is", "was", "are", "were", "be", "been", "it", "its", "that", "which", "who", "whose",
    "what", "where", "when", "does", "do", "did", "they", "he", "she", "his", "her", "their",
})
# fmt: on


def dropped_word_variants(template: str) -> list[str]:
    """The template once per content word, without it ("X is a twin city of" -> "X is a city
    of", "X is a twin of"): a near miss that keeps the wording and changes the question."""
    words = template.split()
    return [
        " ".join(words[:i] + words[i + 1 :])
        for i, word in enumerate(words)
        if PLACEHOLDER not in word and word.lower().strip("?,.:'") not in FUNCTION_WORDS
    ]


@dataclass(frozen=True)
class NearMisses:
    """For each prompt template, the near misses that read most like it: prompt templates of
    another relation group ("X is a twin city of" vs "X worked in the city of") and, with
    `drop_words`, templates less one content word, unless that reads like a real template
    (`same_wording`). They share the words that matter to the encoder and ask something else.
    Found once per set of groups; `examples` draws from them for any examples."""

    rows: dict[str, int]  # prompt template -> its row of `nearest`
    candidates: list[str]  # templates, then the kept dropped-word variants
    nearest: torch.Tensor  # [templates, per_template] indices into candidates

    @classmethod
    def find(
        cls,
        groups: dict[str, int],
        encoder: SentenceEncoder,
        *,
        per_template: int = 5,
        drop_words: bool = True,
        same_wording: float = 0.9,
    ) -> NearMisses:
        names = sorted(groups)
        group_of = torch.tensor([groups[name] for name in names])
        variants = (
            sorted({v for name in names for v in dropped_word_variants(name)} - set(names))
            if drop_words
            else []
        )
        with torch.no_grad():
            embeddings = encoder.encode(names)
            embeddings_all = embeddings
            if variants:
                variant_embeddings = encoder.encode(variants)
                reads_like_a_template = (variant_embeddings @ embeddings.T).amax(1) > same_wording
                keep = (~reads_like_a_template).nonzero().flatten().tolist()
                variants = [variants[i] for i in keep]
                embeddings_all = torch.cat([embeddings, variant_embeddings[keep]])
        candidates = names + variants
        similarity = embeddings @ embeddings_all.T  # [templates, templates + variants]
        same_group = group_of[:, None] == group_of[None, :]
        similarity[:, : len(names)][same_group] = -math.inf
        nearest = similarity.topk(min(per_template, len(candidates) - 1), dim=1).indices
        return cls({name: row for row, name in enumerate(names)}, candidates, nearest)

    def examples(self, examples: Sequence[RelationExample], seed: int = 0) -> list[RelationExample]:
        """Each example whose prompt template is known again, its `other` now one of its
        template's near misses (drawn at random, seeded) with its subject."""
        generator = torch.Generator().manual_seed(seed)
        mined = []
        for example in examples:
            row = self.rows.get(mask_subject(example.prompt, [example.subject]))
            if row is None:
                continue
            draw = int(torch.randint(0, self.nearest.shape[1], (1,), generator=generator))
            other = self.candidates[int(self.nearest[row, draw])]
            mined.append(replace(example, other=other.replace(PLACEHOLDER, example.subject, 1)))
        return mined


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
