"""The LKS hypernetwork: one small network for the whole edit set, from a subject's feature
state to the change of its knowledge block. Zero-initialised output, so an untrained pack
changes nothing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from server.editor.config import HypernetKind

# The residual kind's MLP learns at this fraction of the linear map's rate: the map fits what
# it can first, and the MLP takes what a linear map of the subject's state cannot reach, which
# grows with the number of facts.
RESIDUAL_LR_SCALE = 0.1


def _mlp(hidden_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, 4 * hidden_size), nn.GELU(), nn.Linear(4 * hidden_size, hidden_size)
    )


def _zero_output(part: nn.Module) -> None:
    out = part if isinstance(part, nn.Linear) else part[-1]
    assert isinstance(out, nn.Linear)
    with torch.no_grad():
        out.weight.zero_()
        out.bias.zero_()


def starts_from(kind: HypernetKind, previous: object) -> bool:
    """Whether a hypernetwork of `kind` can start from the weights of one of kind `previous`."""
    return previous == kind or (kind == "residual" and previous == "linear")


class Hypernetwork(nn.Module):
    """`linear`: one map W f + b (the LKS reference's default); `mlp`: hidden -> 4*hidden ->
    hidden with GELU (the reference's other); `residual`: the two added, the MLP slower. The
    kind a build uses is `TrainConfig.hypernet`'s."""

    def __init__(self, hidden_size: int, kind: HypernetKind) -> None:
        super().__init__()
        self.kind = kind
        self.net: nn.Module = (
            nn.Linear(hidden_size, hidden_size) if kind != "mlp" else _mlp(hidden_size)
        )
        self.branch: nn.Module | None = _mlp(hidden_size) if kind == "residual" else None
        for part in (self.net, self.branch):
            if part is not None:
                _zero_output(part)

    def load_start(self, weights: Mapping[str, torch.Tensor]) -> None:
        """A previous version's weights, as `starts_from` allows: the residual kind takes a
        linear map's as its map, its MLP at zero (so its deltas are the map's)."""
        if self.branch is not None and not any(k.startswith("branch.") for k in weights):
            self.net.load_state_dict({k.removeprefix("net."): v for k, v in weights.items()})
            _zero_output(self.branch)
        else:
            self.load_state_dict(weights)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The optimiser's groups: the residual kind's MLP at RESIDUAL_LR_SCALE of `lr`."""
        groups: list[dict[str, Any]] = [{"params": list(self.net.parameters()), "lr": lr}]
        if self.branch is not None:
            groups.append({"params": list(self.branch.parameters()), "lr": lr * RESIDUAL_LR_SCALE})
        return groups

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [S, H] (raw layer-L states of the feature texts) -> deltas [S, H]."""
        scale = features.pow(2).mean(dim=-1, keepdim=True).add(1e-6).rsqrt()
        normed = features * scale
        out = self.net(normed)
        return out if self.branch is None else out + self.branch(normed)
