"""The HTTP layer: app factory, protocol models, routes, one error envelope.

`create_app` loads on first use (PEP 562): `server.api.auth`, which `lks keys` reads, must not
load the whole app and its model code."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.api.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name != "create_app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module("server.api.app").create_app
