"""The LKS hypernetwork: one small network for the whole edit set, from a subject's feature
state to the change of its knowledge block. Zero-initialised output, so an untrained pack
changes nothing."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

HypernetKind = Literal["linear", "mlp"]


class Hypernetwork(nn.Module):
    def __init__(self, hidden_size: int, kind: HypernetKind = "linear") -> None:
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.net: nn.Module = nn.Linear(hidden_size, hidden_size)
            out = self.net
        else:
            out = nn.Linear(4 * hidden_size, hidden_size)
            self.net = nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.GELU(), out)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [S, H] (raw layer-L states of the feature texts) -> deltas [S, H]."""
        scale = features.pow(2).mean(dim=-1, keepdim=True).add(1e-6).rsqrt()
        return self.net(features * scale)
