"""Edit packs as data: the on-disk format, the store of versions, and the live registry.

The names below load on first use (PEP 562), so that importing a light submodule (`names`,
`errors`) does not load torch through `format`: the CLI's commands that need no model start
without it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names, for type checkers
    from server.packs.errors import InvalidPackRefError as InvalidPackRefError
    from server.packs.errors import PackCorruptError as PackCorruptError
    from server.packs.errors import PackError as PackError
    from server.packs.errors import PackIncompatibleError as PackIncompatibleError
    from server.packs.errors import PackNotFoundError as PackNotFoundError
    from server.packs.format import FORMAT_VERSION as FORMAT_VERSION
    from server.packs.format import Manifest as Manifest
    from server.packs.format import Pack as Pack
    from server.packs.format import PackContent as PackContent
    from server.packs.format import SubjectEntry as SubjectEntry
    from server.packs.names import PackRef as PackRef
    from server.packs.store import PackStore as PackStore

# each exported name -> the submodule that defines it
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
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
