"""Edit packs as data: the on-disk format, the store of versions, and the live registry.

The names below load on first use (PEP 562), so that importing a light submodule (`names`,
`errors`) does not load torch through `format`: the CLI's commands that need no model start
without it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.packs.errors import (
        InvalidPackRefError,
        PackCorruptError,
        PackError,
        PackIncompatibleError,
        PackNotFoundError,
    )
    from server.packs.format import FORMAT_VERSION, Manifest, Pack, PackContent, SubjectEntry
    from server.packs.names import PackRef
    from server.packs.store import PackStore

_EXPORTS = {
    "FORMAT_VERSION": "format",
    "InvalidPackRefError": "errors",
    "Manifest": "format",
    "Pack": "format",
    "PackContent": "format",
    "PackCorruptError": "errors",
    "PackError": "errors",
    "PackIncompatibleError": "errors",
    "PackNotFoundError": "errors",
    "PackRef": "names",
    "PackStore": "store",
    "SubjectEntry": "format",
}
__all__ = [
    "FORMAT_VERSION",
    "InvalidPackRefError",
    "Manifest",
    "Pack",
    "PackContent",
    "PackCorruptError",
    "PackError",
    "PackIncompatibleError",
    "PackNotFoundError",
    "PackRef",
    "PackStore",
    "SubjectEntry",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
