"""The two sides a server runs, built by the app's lifespan each on its own: the runtime that
serves (backbone, engine, scheduler, pack registry) and the training side (job store, worker).

The training side opens first, before the model loads, so submissions are accepted meanwhile;
the runtime is built once the backbone is loaded, and the worker starts on it then.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from server.api.metrics import ServerMetrics, ServingStats
from server.engine.engine import BatchEngine
from server.engine.scheduler import Scheduler
from server.gate.encoder import SentenceEncoder
from server.jobs.store import JobStore, StoreUnavailableError
from server.jobs.worker import Worker, WorkerConfig
from server.model import Backbone, load_training_backbone
from server.packs import PackStore
from server.packs.registry import LiveVersions, PackRegistry
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """Everything that serves generation, once the backbone is loaded."""

    backbone: Backbone
    engine: BatchEngine
    scheduler: Scheduler
    registry: PackRegistry

    @classmethod
    def start(
        cls,
        backbone: Backbone,
        settings: Settings,
        packs: PackStore,
        metrics: ServerMetrics,
        *,
        live_record: LiveVersions | None,
        cpu_threads: int | None = None,
    ) -> Runtime:
        """Build the engine, its scheduler thread and the pack registry, and start the thread.
        `live_record` shares hand-made activations with every server of the same database."""
        engine = BatchEngine(
            backbone,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
            on_step=metrics.batch_size.observe,
            slot_cache=settings.slot_kv_cache,
            compile_decode=settings.compiles_decode_on(backbone.device.type),
            release_answered_edits=settings.release_answered_edits,
        )
        scheduler = Scheduler(
            engine, max_queued=settings.max_queued_requests, cpu_threads=cpu_threads
        )
        registry = PackRegistry(
            packs,
            backbone,
            memory_budget_bytes=settings.pack_memory_mb << 20,
            pinned=frozenset(settings.pinned_packs),
            live_record=live_record,
        )
        scheduler.start()
        return cls(backbone, engine, scheduler, registry)

    def stats(self) -> ServingStats:
        """What /metrics reports of the engine and the loaded packs, read now."""
        return ServingStats(
            waiting=len(self.engine.waiting),
            running=self.engine.running,
            in_flight=self.scheduler.in_flight,
            packs_loaded=len(self.registry.loaded()),
            pack_bytes=self.registry.loaded_bytes,
            client_disconnects=self.scheduler.aborted,
        )

    async def stop(self) -> None:
        await asyncio.to_thread(self.scheduler.stop)


class Training:
    """The job store and, once there is a backbone to train on, the worker thread."""

    def __init__(self, settings: Settings, packs: PackStore, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.packs = packs
        self.metrics = metrics
        self.jobs: JobStore | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> None:
        """Open the job store. A database down at start answers 503 until it returns; the store
        then migrates and serves without a restart."""
        self.jobs = JobStore(self.settings.jobs_database_url)
        try:
            self.jobs.migrate()
        except StoreUnavailableError as exc:
            log.error("job store unavailable: %s (submissions answer 503 until it returns)", exc)

    def job_counts(self) -> dict[str, int]:
        """Jobs by state (a database query: call it off the event loop)."""
        return self.jobs.count_by_state() if self.jobs is not None else {}

    def start_worker(
        self,
        backbone: Backbone,
        encoder_factory: Callable[[], SentenceEncoder],
        on_published: Callable[[str, int], None],
    ) -> None:
        """Train jobs on `backbone` in a thread of this process (unless LKS_WORKER is off)."""
        if not self.settings.worker or self.jobs is None:
            return
        worker = Worker(
            self.jobs,
            self.packs,
            backbone,
            WorkerConfig.from_settings(self.settings),
            encoder_factory=encoder_factory,
            training_factory=lambda: load_training_backbone(self.settings, backbone),
            on_published=on_published,
            on_finished=self.metrics.observe_job,
        )
        self._thread = threading.Thread(
            target=worker.run_forever,
            args=(self._stop,),
            kwargs={"thread_per_job": True},  # its training's CPU threads end with each job
            name="lks-worker",
            daemon=True,
        )
        self._thread.start()

    async def stop_worker(self) -> None:
        self._stop.set()
        if self._thread is not None:  # a job cut short is reclaimed when its lease ends
            await asyncio.to_thread(self._thread.join, 5.0)

    def close(self) -> None:
        if self.jobs is not None:
            self.jobs.close()
