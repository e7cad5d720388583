"""What the app holds for its lifetime, and typed dependencies to reach it from a route."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from server.api.errors import APIError
from server.engine.generate import Generator
from server.model import Backbone, load_backbone
from server.packs import PackStore
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    settings: Settings
    store: PackStore
    backbone: Backbone | None = None
    generator: Generator | None = None
    load_error: str | None = None
    _loading: asyncio.Task[None] | None = field(default=None, repr=False)

    def attach(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self.generator = Generator(backbone)

    async def load_in_background(self) -> None:
        """Load the backbone off the event loop so /healthz answers while it loads."""

        async def _load() -> None:
            try:
                self.attach(await asyncio.to_thread(load_backbone, self.settings))
            except Exception as exc:
                self.load_error = str(exc)
                log.critical("the backbone failed to load: %s", exc)

        self._loading = asyncio.create_task(_load())

    async def close(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()


def get_state(request: Request) -> ServerState:
    return request.app.state.lks


def get_generator(state: Annotated[ServerState, Depends(get_state)]) -> Generator:
    if state.generator is None:
        detail = state.load_error or "the model is still loading; retry shortly"
        raise APIError(503, f"not ready: {detail}")
    return state.generator


StateDep = Annotated[ServerState, Depends(get_state)]
GeneratorDep = Annotated[Generator, Depends(get_generator)]
