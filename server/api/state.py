"""What the app holds for its lifetime, and typed dependencies to reach it from a route."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from server.api.errors import APIError
from server.engine.engine import BatchEngine
from server.engine.scheduler import Scheduler
from server.model import Backbone, load_backbone
from server.packs import PackStore
from server.packs.registry import PackRegistry
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Serving:
    """Everything that exists once the backbone is loaded."""

    backbone: Backbone
    scheduler: Scheduler
    registry: PackRegistry


@dataclass
class ServerState:
    settings: Settings
    store: PackStore
    serving: Serving | None = None
    load_error: str | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, repr=False)

    @property
    def backbone(self) -> Backbone | None:
        return self.serving.backbone if self.serving is not None else None

    def attach(self, backbone: Backbone) -> None:
        settings = self.settings
        engine = BatchEngine(backbone, max_batch_size=settings.max_batch_size)
        scheduler = Scheduler(engine, max_queued=settings.max_queued_requests)
        registry = PackRegistry(
            self.store,
            backbone,
            memory_budget_bytes=settings.pack_memory_mb << 20,
            pinned=frozenset(settings.pinned_packs),
        )
        scheduler.start()
        self.serving = Serving(backbone, scheduler, registry)
        self._tasks.append(asyncio.create_task(self._watch_packs(registry)))

    async def load_in_background(self) -> None:
        """Load the backbone off the event loop so /healthz answers while it loads."""

        async def _load() -> None:
            try:
                self.attach(await asyncio.to_thread(load_backbone, self.settings))
            except Exception as exc:
                self.load_error = str(exc)
                log.critical("the backbone failed to load: %s", exc)

        self._tasks.append(asyncio.create_task(_load()))

    async def _watch_packs(self, registry: PackRegistry) -> None:
        """Swap in newly published pack versions within one poll interval."""
        while True:
            try:
                await asyncio.to_thread(registry.refresh)
            except Exception:
                log.exception("checking the pack store failed; retrying")
            await asyncio.sleep(self.settings.pack_poll_seconds)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.serving is not None:
            await asyncio.to_thread(self.serving.scheduler.stop)


def get_state(request: Request) -> ServerState:
    return request.app.state.lks


def get_serving(state: Annotated[ServerState, Depends(get_state)]) -> Serving:
    if state.serving is None:
        detail = state.load_error or "the model is still loading; retry shortly"
        raise APIError(503, f"not ready: {detail}", retry_after=5 if not state.load_error else None)
    return state.serving


StateDep = Annotated[ServerState, Depends(get_state)]
ServingDep = Annotated[Serving, Depends(get_serving)]
