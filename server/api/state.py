"""What the app holds for its lifetime, and typed dependencies to reach it from a route."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, Request

from server.api.auth import Authenticator, KeyRecord, Role
from server.api.errors import APIError
from server.api.metrics import ServerMetrics
from server.engine.engine import BatchEngine
from server.engine.scheduler import Scheduler
from server.jobs.store import JobStore, StoreUnavailableError
from server.jobs.worker import Worker, WorkerConfig
from server.model import Backbone, load_backbone
from server.packs import PackStore
from server.packs.registry import PackRegistry, Swap
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
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    auth: Authenticator = field(default_factory=lambda: Authenticator(None))
    serving: Serving | None = None
    load_error: str | None = None
    jobs: JobStore | None = None
    jobs_error: str | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, repr=False)
    _worker_stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _worker_thread: threading.Thread | None = field(default=None, repr=False)

    def open_jobs(self) -> None:
        """The job store opens before the model loads: submissions are accepted meanwhile. A
        database down at start answers 503 until it returns; the store then migrates and
        serves without a restart."""
        self.jobs = JobStore(self.settings.jobs_database_url)
        try:
            self.jobs.migrate()
        except StoreUnavailableError as exc:
            log.error("job store unavailable: %s (submissions answer 503 until it returns)", exc)

    def start_worker(self, serving: Serving) -> None:
        if not self.settings.worker or self.jobs is None:
            return
        settings = self.settings
        worker = Worker(
            self.jobs,
            self.store,
            serving.backbone,
            WorkerConfig.from_settings(settings),
            encoder_factory=serving.registry.gate_encoder,
            on_published=lambda _name, _version: self._count_swaps(serving.registry.refresh()),
            on_finished=self.metrics.observe_job,
        )
        self._worker_thread = threading.Thread(
            target=worker.run_forever, args=(self._worker_stop,), name="lks-worker", daemon=True
        )
        self._worker_thread.start()

    @property
    def backbone(self) -> Backbone | None:
        return self.serving.backbone if self.serving is not None else None

    def attach(self, backbone: Backbone) -> None:
        settings = self.settings
        engine = BatchEngine(
            backbone,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
            on_step=self.metrics.batch_size.observe,
            slot_cache=settings.slot_kv_cache,
            compile_decode=settings.compile_decode,
        )
        scheduler = Scheduler(engine, max_queued=settings.max_queued_requests)
        registry = PackRegistry(
            self.store,
            backbone,
            memory_budget_bytes=settings.pack_memory_mb << 20,
            pinned=frozenset(settings.pinned_packs),
            live_record=self.jobs,  # activations shared with every server of this database
        )
        scheduler.start()
        self.serving = Serving(backbone, scheduler, registry)
        self._tasks.append(asyncio.create_task(self._watch_packs(registry)))
        self.start_worker(self.serving)

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
        self._worker_stop.set()
        if self._worker_thread is not None:  # a job cut short is reclaimed when its lease ends
            await asyncio.to_thread(self._worker_thread.join, 5.0)
        if self.serving is not None:
            await asyncio.to_thread(self.serving.scheduler.stop)
        if self.jobs is not None:
            self.jobs.close()


def get_state(request: Request) -> ServerState:
    return request.app.state.lks


def get_serving(state: Annotated[ServerState, Depends(get_state)]) -> Serving:
    """503 until the backbone is loaded; the load error itself (paths) stays in the log."""
    if state.serving is None:
        if state.load_error:
            raise APIError(503, "not ready: the model failed to load; see the server log")
        raise APIError(503, "not ready: the model is still loading; retry shortly", retry_after=5)
    return state.serving


def get_job_store(state: Annotated[ServerState, Depends(get_state)]) -> JobStore:
    """503 while the job store is down; the database's error text stays in the log."""
    if state.jobs is None:
        raise APIError(
            503, "the job store is unavailable; see the server log, retry shortly", retry_after=5
        )
    return state.jobs


@dataclass(frozen=True)
class Caller:
    """Who is asking (already authenticated): checks role and packs against an endpoint."""

    auth: Authenticator
    key: KeyRecord | None  # None: auth is off

    def require(self, role: Role, packs: Iterable[str] = ()) -> None:
        """403 unless the key has `role` and may use every pack in `packs`."""
        self.auth.authorize(self.key, role, packs)

    def allows(self, pack: str) -> bool:
        """Whether the caller may see or manage `pack` (for filtering listings)."""
        return self.key is None or self.key.allows(pack)

    @property
    def pack_scope(self) -> list[str] | None:
        """The packs the key is limited to; None when it may use every pack."""
        if self.key is None or "*" in self.key.packs:
            return None
        return list(self.key.packs)


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
ServingDep = Annotated[Serving, Depends(get_serving)]
