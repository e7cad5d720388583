"""The unedited model's next-token distributions that the KL terms hold the edited model to,
kept as each position's k most likely tokens and the rest's total mass.

A reference distribution does not change while training, so it goes through the output head
once, before the first epoch, instead of at every step beside the edited states (a product as
wide as the vocabulary, as costly as the edited rows' own). Kept whole it would cost a
vocabulary's floats per position (0.2 MB on the default model: gigabytes for a large pack);
kept as its top k plus one bucket for the rest it costs a few hundred bytes, and the KL over
those k + 1 outcomes is the KL of the coarsened distributions: never above the exact one, equal
to it when the rest holds a single token, and the edited model still cannot move mass into
the rest without paying for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Reference rows per head product while they are reduced (bounds the vocabulary-wide logits).
_ROWS_PER_PRODUCT = 256


@dataclass(frozen=True)
class ReferenceTop:
    """A sequence's reference distributions at its P KL positions: the `ids` [P, k] of the k
    most likely tokens, their `logprobs` [P, k], and the log of everything else's mass `rest`
    [P]."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    rest: torch.Tensor

    @property
    def positions(self) -> int:
        return int(self.ids.shape[0])


def top_of(logits: torch.Tensor, k: int) -> ReferenceTop:
    """`logits` [P, V] reduced to their top `k` tokens and the rest (k is capped at V - 1, so
    the rest always holds a token: with one, the KL over the buckets is the exact KL)."""
    k = max(1, min(k, logits.shape[-1] - 1))
    logprobs = logits.float().log_softmax(-1)
    top, ids = logprobs.topk(k, dim=-1)
    rest = logprobs.scatter(-1, ids, -torch.inf).logsumexp(-1)
    return ReferenceTop(ids.to(torch.int32), top, rest)


@torch.no_grad()
def reference_tops(
    head: torch.nn.Module,
    states: Sequence[torch.Tensor | None],
    k: int,
    *,
    dtype: torch.dtype = torch.float32,
) -> list[ReferenceTop | None]:
    """Each sequence's final reference `states` [P, H] (None: a sequence without a KL term)
    through the output `head` in `dtype` (the backbone's), reduced to `top_of`; a few hundred
    rows per product."""
    tops: list[ReferenceTop | None] = [None] * len(states)
    pending: list[int] = []
    rows = 0

    def flush() -> None:
        nonlocal rows
        if not pending:
            return
        logits = head(torch.cat([states[i] for i in pending]).to(dtype))  # type: ignore[misc]
        top = top_of(logits, k)
        start = 0
        for i in pending:
            end = start + states[i].shape[0]  # type: ignore[union-attr]
            tops[i] = ReferenceTop(top.ids[start:end], top.logprobs[start:end], top.rest[start:end])
            start = end
        pending.clear()
        rows = 0

    for i, state in enumerate(states):
        if state is None:
            continue
        pending.append(i)
        rows += state.shape[0]
        if rows >= _ROWS_PER_PRODUCT:
            flush()
    flush()
    return tops


def concat(tops: Sequence[ReferenceTop], device: torch.device) -> ReferenceTop:
    """Several sequences' references as one, their positions in order, on `device`."""
    return ReferenceTop(
        torch.cat([t.ids for t in tops]).to(device, torch.long),
        torch.cat([t.logprobs for t in tops]).to(device),
        torch.cat([t.rest for t in tops]).to(device),
    )


def kl_from_reference(
    logits: torch.Tensor, reference: ReferenceTop, log_normalizer: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(reference || edited) [P] over the reference's k tokens and its rest, from the edited
    `logits` [P, V] (float32); `log_normalizer`: their logsumexp, where the caller has it."""
    log_z = logits.logsumexp(-1) if log_normalizer is None else log_normalizer
    top = logits.gather(-1, reference.ids) - log_z[:, None]
    rest = logits.scatter(-1, reference.ids, -torch.inf).logsumexp(-1) - log_z
    edited = torch.cat([top, rest[:, None]], dim=-1)
    unedited = torch.cat([reference.logprobs, reference.rest[:, None]], dim=-1)
    return F.kl_div(edited, unedited, log_target=True, reduction="none").sum(-1)
