"""Which version of each pack is live, as every server of one pack store shares it (the job
store keeps it in PostgreSQL). Its own module, free of torch, so the job store need not load
the registry to name it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Activation:
    """A version made live by hand, and the newest version there was then: a newer one, once
    published, is live instead."""

    version: int
    newest: int


class LiveVersions(Protocol):
    """The activations of every pack, shared by every server of one pack store."""

    def activations(self) -> dict[str, Activation]: ...

    def record_activation(self, name: str, activation: Activation) -> None: ...
