"""What the app holds for its lifetime, and typed dependencies to reach it from a route.

The lifespan (`app.py`) opens the training side, then builds the runtime once the backbone is
loaded (`attach`), and with it one serving object per API flavour, as vLLM's `init_app_state`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Annotated

import torch
from fastapi import Depends, Header, Request

from server.api.auth import Authenticator, Caller
from server.api.errors import APIError
from server.api.metrics import ServerMetrics, ServingStats
from server.api.openai_serving import OpenAIServingChat, OpenAIServingCompletion
from server.api.runtime import Runtime, Training
from server.api.serving import NativeServing
from server.jobs.store import JobStore
from server.model import Backbone, load_backbone
from server.packs import PackStore
from server.packs.registry import PackRegistry, Swap
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Servings:
    """One serving object per API flavour, over the same runtime."""

    native: NativeServing
    completion: OpenAIServingCompletion
    chat: OpenAIServingChat

    @classmethod
    def of(cls, runtime: Runtime, settings: Settings, metrics: ServerMetrics) -> Servings:
        return cls(
            NativeServing(runtime, settings, metrics),
            OpenAIServingCompletion(runtime, settings, metrics),
            OpenAIServingChat(runtime, settings, metrics),
        )


@dataclass
class ServerState:
    settings: Settings
    store: PackStore
    training: Training
    metrics: ServerMetrics
    auth: Authenticator
    # the engine thread's CPU threads: LKS_CPU_THREADS, else the process's count at start-up
    cpu_threads: int
    runtime: Runtime | None = None
    servings: Servings | None = None
    load_error: str | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, repr=False)

    @classmethod
    def create(cls, settings: Settings, auth: Authenticator) -> ServerState:
        store, metrics = PackStore.from_settings(settings), ServerMetrics()
        threads = settings.cpu_threads or torch.get_num_threads()
        state = cls(settings, store, Training(settings, store, metrics), metrics, auth, threads)
        metrics.watch(state.serving_stats, state.training.job_counts)
        return state

    def serving_stats(self) -> ServingStats | None:
        return self.runtime.stats() if self.runtime is not None else None

    def attach(self, backbone: Backbone) -> None:
        """Build the runtime on a loaded backbone, the serving objects on it, and start the pack
        watcher and the worker."""
        runtime = Runtime.start(
            backbone,
            self.settings,
            self.store,
            self.metrics,
            live_record=self.training.jobs,  # activations shared with every server of the db
            cpu_threads=self.cpu_threads,
        )
        self.runtime = runtime
        self.servings = Servings.of(runtime, self.settings, self.metrics)
        self._tasks.append(asyncio.create_task(self._watch_packs(runtime.registry)))
        self.training.start_worker(
            backbone,
            runtime.registry.gate_encoder,
            on_published=lambda _name, _version: self._count_swaps(runtime.registry.refresh()),
        )

    async def load_in_background(self) -> None:
        """Load the backbone off the event loop so /healthz answers while it loads."""

        async def _load() -> None:
            try:
                self.attach(await asyncio.to_thread(load_backbone, self.settings))
            except Exception as exc:
                self.load_error = str(exc)
                log.critical("the backbone failed to load: %s", exc)

        self._tasks.append(asyncio.create_task(_load()))

    def _count_swaps(self, swaps: list[Swap]) -> None:
        self.metrics.pack_swaps.inc(len(swaps))

    async def _watch_packs(self, registry: PackRegistry) -> None:
        """Swap in newly published pack versions within one poll interval."""
        while True:
            try:
                self._count_swaps(await asyncio.to_thread(registry.refresh))
            except Exception:
                log.exception("checking the pack store failed; retrying")
            await asyncio.sleep(self.settings.pack_poll_seconds)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.training.stop_worker()
        if self.runtime is not None:
            await self.runtime.stop()
        self.training.close()


def get_state(request: Request) -> ServerState:
    return request.app.state.lks


def get_runtime(state: Annotated[ServerState, Depends(get_state)]) -> Runtime:
    """503 until the backbone is loaded; the load error itself (paths) stays in the log."""
    if state.runtime is None:
        if state.load_error:
            raise APIError(503, "not ready: the model failed to load; see the server log")
        raise APIError(503, "not ready: the model is still loading; retry shortly", retry_after=5)
    return state.runtime


def get_servings(
    state: Annotated[ServerState, Depends(get_state)],
    _: Annotated[Runtime, Depends(get_runtime)],
) -> Servings:
    assert state.servings is not None, "built with the runtime"
    return state.servings


def get_native(servings: Annotated[Servings, Depends(get_servings)]) -> NativeServing:
    return servings.native


def get_completion(servings: Annotated[Servings, Depends(get_servings)]) -> OpenAIServingCompletion:
    return servings.completion


def get_chat(servings: Annotated[Servings, Depends(get_servings)]) -> OpenAIServingChat:
    return servings.chat


def get_job_store(state: Annotated[ServerState, Depends(get_state)]) -> JobStore:
    """503 while the job store is down; the database's error text stays in the log."""
    if state.training.jobs is None:
        raise APIError(
            503, "the job store is unavailable; see the server log, retry shortly", retry_after=5
        )
    return state.training.jobs


def get_caller(
    state: Annotated[ServerState, Depends(get_state)],
    authorization: Annotated[str | None, Header()] = None,
) -> Caller:
    """Authenticate (401/429/503). Every API router lists this as its first dependency, so it
    runs before the route reaches the model, the job store or the pack store."""
    return Caller(state.auth, state.auth.authenticate(authorization))


StateDep = Annotated[ServerState, Depends(get_state)]
CallerDep = Annotated[Caller, Depends(get_caller)]
JobStoreDep = Annotated[JobStore, Depends(get_job_store)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
NativeDep = Annotated[NativeServing, Depends(get_native)]
CompletionDep = Annotated[OpenAIServingCompletion, Depends(get_completion)]
ChatDep = Annotated[OpenAIServingChat, Depends(get_chat)]
