"""Sampling parameters and the per-row sampler of a batched decode step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)  # generation ends before any of these
    ignore_eos: bool = False  # always generate max_tokens (benchmarks)

    def __post_init__(self) -> None:
        assert self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"
        assert self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"
        assert 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"
        assert all(self.stop), "stop strings must not be empty"

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_rng(params: SamplingParams) -> torch.Generator | None:
    """A private generator for a seeded request, so its samples do not depend on its batch."""
    return torch.Generator().manual_seed(params.seed) if params.seed is not None else None


def sample_rows(
    logits: torch.Tensor, params: Sequence[SamplingParams], rngs: Sequence[torch.Generator | None]
) -> list[int]:
    """One next token per row of `logits` [B, V], each row with its own parameters."""
    assert logits.ndim == 2 and logits.shape[0] == len(params) == len(rngs), (
        f"logits {tuple(logits.shape)} for {len(params)} rows"
    )
    tokens = logits.argmax(dim=-1).tolist()  # greedy rows: the common case, one vectorised op
    for row, (p, rng) in enumerate(zip(params, rngs, strict=True)):
        if p.greedy:
            continue
        probs = torch.softmax(logits[row].float() / p.temperature, dim=-1).cpu()
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs > p.top_p  # keep the nucleus
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        tokens[row] = int(torch.multinomial(probs, 1, generator=rng).item())
    return tokens
