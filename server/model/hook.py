"""The one place where an edit touches the model: a persistent forward hook on the edit layer.

The hook is registered once for the life of the backbone and reads an `EditPlan` that the caller
sets for exactly one forward pass (the prefill); decode steps and passes without a plan go
through untouched. Requests of different packs share a batch because the plan names the row.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class EditPlan:
    """For one forward pass: add `deltas[i]` to the layer output at (`rows[i]`, `positions[i]`)."""

    rows: torch.Tensor  # [E] long
    positions: torch.Tensor  # [E] long
    deltas: torch.Tensor  # [E, hidden]

    def __post_init__(self) -> None:
        count = self.rows.shape[0]
        assert self.positions.shape == (count,), "rows and positions must pair up"
        assert self.deltas.ndim == 2 and self.deltas.shape[0] == count, (
            f"deltas {tuple(self.deltas.shape)} do not match {count} edits"
        )

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @classmethod
    def build(
        cls, edits: list[tuple[int, int, torch.Tensor]], *, hidden_size: int, device: torch.device
    ) -> EditPlan:
        """From (row, position, delta) triples."""
        if not edits:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return cls(empty, empty, torch.zeros(0, hidden_size, device=device))
        rows = torch.tensor([e[0] for e in edits], dtype=torch.long, device=device)
        positions = torch.tensor([e[1] for e in edits], dtype=torch.long, device=device)
        return cls(rows, positions, torch.stack([e[2] for e in edits]).to(device))


class EditHook:
    """A forward hook on one decoder layer that applies the plan of the current pass."""

    def __init__(self, layer: nn.Module, layer_index: int) -> None:
        self.layer_index = layer_index
        self._local = threading.local()  # the plan belongs to the thread running the pass
        self._handle = layer.register_forward_hook(self._apply)

    @contextmanager
    def plan(self, plan: EditPlan | None) -> Iterator[None]:
        """Apply `plan` to the next forward pass of this thread only (then it is spent)."""
        self._local.plan = plan if plan is not None and len(plan) else None
        try:
            yield
        finally:
            self._local.plan = None

    def _apply(
        self, _module: nn.Module, _args: tuple[object, ...], output: object
    ) -> object | None:
        if torch.compiler.is_compiling():
            # Only the prefill carries a plan and it always runs eager; a compiled pass (the
            # decode step) must not trace this thread-local lookup, which would break its graph.
            return None
        plan: EditPlan | None = getattr(self._local, "plan", None)
        if plan is None:
            return None
        self._local.plan = None  # one pass only: the KV cache carries the edit into decoding
        hidden = output[0] if isinstance(output, tuple) else output
        assert isinstance(hidden, torch.Tensor) and hidden.ndim == 3, (
            "expected [batch, seq, hidden]"
        )
        assert int(plan.positions.max()) < hidden.shape[1], (
            f"plan position {int(plan.positions.max())} beyond sequence length {hidden.shape[1]}"
        )
        edited = hidden.index_put(
            (plan.rows, plan.positions), plan.deltas.to(hidden.dtype), accumulate=True
        )
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    def remove(self) -> None:
        self._handle.remove()


class EditHooks:
    """One persistent hook per edited layer of a backbone, created on first use."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self._layers = layers
        self._hooks: dict[int, EditHook] = {}
        self._lock = threading.Lock()

    def at(self, layer_index: int) -> EditHook:
        with self._lock:
            if layer_index not in self._hooks:
                self._hooks[layer_index] = EditHook(self._layers[layer_index], layer_index)
            return self._hooks[layer_index]
