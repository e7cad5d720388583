"""Sampling parameters and the per-row sampler of a batched decode step.

Sampling is numerically safe for any parameters a client can send: a temperature or `top_p`
below a floor (down to denormals, where dividing logits by the temperature overflows) acts as
greedy / top-1, and a row whose logits are not usable fails alone (`RowSamplingError`) instead
of raising out of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# Below these a request is sampled greedily: at temperature 1e-4 a runner-up 0.01 behind in
# logit is already e^100 times less likely, while dividing by far smaller values overflows.
TEMPERATURE_FLOOR = 1e-4
TOP_P_FLOOR = 1e-6


class RowSamplingError(ValueError):
    """One row's logits cannot be sampled (NaN or +inf, or nothing finite)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 (or below TEMPERATURE_FLOOR) is greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)  # generation ends before any of these
    ignore_eos: bool = False  # always generate max_tokens (benchmarks)

    def __post_init__(self) -> None:
        # Real checks (not asserts): they guard the engine thread from any caller.
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not all(self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < TEMPERATURE_FLOOR or self.top_p < TOP_P_FLOOR


def make_rng(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A private generator for a seeded request, on the device its logits are on, so its samples
    do not depend on its batch."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def best(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's greedy pick, and [B] True where no sampler can use the row (a NaN or +inf
    anywhere, or nothing finite), in one pass: a row's maximum is NaN, +inf or -inf exactly
    then."""
    values, picks = logits.max(dim=-1)
    return picks, ~torch.isfinite(values)


def sample_rows(
    logits: torch.Tensor, params: Sequence[SamplingParams], rngs: Sequence[torch.Generator | None]
) -> list[int | RowSamplingError]:
    """One next token per row of `logits` [B, V], each row with its own parameters; a row that
    cannot be sampled gets a `RowSamplingError` in its place and the others are unaffected.

    Everything runs where the logits are; only the B chosen ids and flags come back to the host,
    in one copy."""
    if not (logits.ndim == 2 and logits.shape[0] == len(params) == len(rngs)):
        raise ValueError(f"logits {tuple(logits.shape)} for {len(params)} rows")
    picks, bad = best(logits)
    for row, (p, rng) in enumerate(zip(params, rngs, strict=True)):
        if not p.greedy:
            # a bad row is sampled from zeros (harmless) and reported below
            safe = torch.where(bad[row], torch.zeros_like(logits[row]), logits[row])
            picks[row] = _sample_one(safe, p, rng)
    chosen, flags = torch.stack([picks, bad.long()]).tolist()
    return [
        RowSamplingError("the model produced NaN or infinite logits") if flag else int(token)
        for token, flag in zip(chosen, flags, strict=True)
    ]


def _sample_one(
    logits: torch.Tensor, params: SamplingParams, rng: torch.Generator | None
) -> torch.Tensor:
    """The sampled id as a one-element tensor on the logits' device."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > params.top_p  # keep the nucleus
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=rng)[0]
