"""The worker: claim a job, build a version of the pack's whole current fact set, publish it.

Building (training, warm start, growth, the quality gate) is `lks.build.build_version`, as for
`lks train`; the worker adds the job around it. A version is published only when it passes the
quality gate; a pack whose last fact was deleted gets a version with no edits. Publishing is
ordered so that a crash at any point leaves every fact and every published pack intact: the pack
directory is written whole and renamed into place, then the database records it, then the
server is told.

A thread renews the job's lease for the whole run (reading facts, loading the encoder,
precompute, training, the table, the quality check, publishing), not only between training
steps: any of them can outlast the lease. An attempt that raises is retried up to
`max_attempts`, then the job ends failed with its last error.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from server.builder.edits import backbone_info
from server.builder.version import BuildPolicy, build_version, latest_start
from server.editor.train import Progress
from server.gate.encoder import SentenceEncoder
from server.jobs.models import JobState
from server.jobs.store import DEFAULT_MAX_ATTEMPTS, Job, JobStore, StoreUnavailableError
from server.model.backbone import Backbone
from server.model.threads import run_on_new_thread
from server.packs.format import BLOCKS_KEY, PackContent
from server.packs.store import PackStore
from server.settings import Settings

log = logging.getLogger(__name__)

PublishedCallback = Callable[[str, int], None]


class JobCancelledError(Exception):
    """The job was cancelled or its lease was lost: stop training, publish nothing."""


@dataclass(frozen=True)
class WorkerConfig:
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 2.0
    poll_seconds: float = 0.5
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    build: BuildPolicy = field(default_factory=BuildPolicy)

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerConfig:
        return cls(
            lease_seconds=settings.job_lease_seconds,
            max_attempts=settings.job_max_attempts,
            build=BuildPolicy.from_settings(settings),
        )


def release_freed_memory() -> None:
    """Hand the heap a finished job freed back to the OS: glibc keeps it otherwise, and a
    server that trains now and then would grow with every job."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class JobLease:
    """Renews a claimed job's lease from its own thread until the job ends, and carries the
    latest progress to the database with each renewal. The job's thread calls `report` (or
    `check`) at its checkpoints and stops there once the job was cancelled or the lease lost."""

    def __init__(self, store: JobStore, job_id: int, owner: str, config: WorkerConfig) -> None:
        self.store = store
        self.job_id = job_id
        self.owner = owner
        self.config = config
        self._progress: tuple[float, float | None] = (0.0, None)
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lks-lease-{job_id}", daemon=True)

    def __enter__(self) -> JobLease:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, progress: float, eta_seconds: float | None = None) -> None:
        self._progress = (progress, eta_seconds)
        self.check()

    def check(self) -> None:
        if self._lost.is_set():
            raise JobCancelledError("cancelled, or the lease was lost to another worker")

    def _renew(self) -> None:
        while not self._stop.wait(self.config.heartbeat_seconds):
            progress, eta = self._progress
            try:
                ours = self.store.heartbeat(
                    self.job_id,
                    self.owner,
                    self.config.lease_seconds,
                    progress=progress,
                    eta_seconds=eta,
                )
            except Exception as exc:  # the database may come back before the lease runs out
                log.warning("job %d: heartbeat failed (%s); retrying", self.job_id, exc)
                continue
            if not ours:
                self._lost.set()
                return


def empty_content(layer: int, hidden_size: int) -> PackContent:
    """A version with no subjects: publishing it takes a pack's last edits out of service."""
    return PackContent(
        layer=layer,
        subjects=[],
        table={BLOCKS_KEY: torch.zeros(0, hidden_size)},
        hypernet={},
        facts=[],
        training={"empty": True},
    )


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(
        self,
        store: JobStore,
        packs: PackStore,
        backbone: Backbone,
        config: WorkerConfig,
        *,
        encoder_factory: Callable[[], SentenceEncoder] = SentenceEncoder,
        training_factory: Callable[[], Backbone] | None = None,
        on_published: PublishedCallback | None = None,
        on_finished: Callable[[bool, float], None] | None = None,
        name: str | None = None,
    ) -> None:
        self.store = store
        self.packs = packs
        self.backbone = backbone
        self.config = config
        self.encoder_factory = encoder_factory
        # the backbone training runs on (`load_training_backbone`); None: `backbone` itself
        self.training_factory = training_factory
        self._training: Backbone | None = None
        self.on_published = on_published
        self.on_finished = on_finished  # (succeeded, seconds): metrics
        self.name = name or worker_name()
        self._encoder: SentenceEncoder | None = None

    def run_forever(self, stop: threading.Event, *, thread_per_job: bool = False) -> None:
        """Run jobs until `stop`. `thread_per_job`: each claim and its job run on a new thread
        that ends with it, so that the CPU threads training starts end with the job instead of
        slowing the engine of the same process (server/model/threads.py)."""
        log.info("worker %s started", self.name)
        while not stop.is_set():
            try:
                worked = (
                    run_on_new_thread(self.run_once, f"lks-job-{self.name}")
                    if thread_per_job
                    else self.run_once()
                )
            except StoreUnavailableError as exc:
                log.warning("worker %s: %s; retrying", self.name, exc)
                worked = False
            if not worked:
                stop.wait(self.config.poll_seconds)
        log.info("worker %s stopped", self.name)

    def run_once(self) -> bool:
        """Run one job if there is one; True if it did."""
        job = self.store.claim(
            self.name, self.config.lease_seconds, max_attempts=self.config.max_attempts
        )
        if job is None:
            return False
        log.info(
            "worker %s: job %d (pack %s, attempt %d)", self.name, job.id, job.pack, job.attempts
        )
        started = time.monotonic()
        succeeded = False
        try:
            with JobLease(self.store, job.id, self.name, self.config) as lease:
                succeeded = self._run(job, lease)
        except JobCancelledError as exc:
            log.info("job %d stopped: %s", job.id, exc)
            self.store.finish(job.id, self.name, JobState.CANCELLED, error=str(exc))
        except Exception as exc:
            log.exception("job %d: attempt %d failed", job.id, job.attempts)
            ended = self.store.fail_attempt(
                job.id,
                self.name,
                f"{type(exc).__name__}: {exc}",
                max_attempts=self.config.max_attempts,
            )
            log.info("job %d is now %s", job.id, ended or "another worker's")
        finally:
            release_freed_memory()
            if self.on_finished is not None:
                self.on_finished(succeeded, time.monotonic() - started)
        return True

    def _encoder_once(self) -> SentenceEncoder:
        if self._encoder is None:
            self._encoder = self.encoder_factory()
        return self._encoder

    def _training_once(self) -> Backbone:
        if self._training is None:
            factory = self.training_factory
            self._training = factory() if factory is not None else self.backbone
        return self._training

    def _run(self, job: Job, lease: JobLease) -> bool:
        stored = self.store.live_facts(job.pack)
        if not stored:
            return self._publish_empty(job, lease)
        facts = [s.fact for s in stored]

        def on_progress(event: Progress) -> None:
            eta = event.eta_s if event.eta_s == event.eta_s else None  # NaN: unknown yet
            lease.report(0.9 * event.fraction, eta)  # the last 10%: checking and publishing

        policy = self.config.build
        candidate = build_version(
            self.backbone,
            facts,
            self._encoder_once(),
            latest_start(self.packs, job.pack, self.backbone, policy.train),
            policy,
            training=self._training_once(),
            progress=on_progress,
            checkpoint=lambda: lease.report(0.9),
        )
        if candidate.rejection is not None:
            self.store.finish(
                job.id,
                self.name,
                JobState.FAILED,
                metrics=candidate.metrics,
                fact_count=len(facts),
                error=candidate.rejection,
            )
            return False
        lease.report(0.95)  # last chance to cancel before anything is written
        self._publish(job, candidate.content, candidate.metrics, [s.id for s in stored])
        return True

    def _publish_empty(self, job: Job, lease: JobLease) -> bool:
        """Every fact was deleted: a version with no edits takes the last ones out of service
        (a pack never published has nothing to take out, and gets no version)."""
        lease.check()
        if not self.packs.versions(job.pack):
            self.store.finish(job.id, self.name, JobState.SUCCEEDED, metrics={}, fact_count=0)
            log.info("job %d: pack %s has no facts and no version; nothing to do", job.id, job.pack)
            return True
        layer = self.config.build.train.resolve_layer(self.backbone.num_layers)
        self._publish(job, empty_content(layer, self.backbone.hidden_size), {}, [])
        return True

    def _publish(
        self, job: Job, content: PackContent, metrics: dict[str, float], fact_ids: list[int]
    ) -> None:
        """Write the version, record it with the job, then tell the server."""
        manifest = self.packs.publish(job.pack, content, backbone_info(self.backbone))
        recorded = self.store.finish(
            job.id,
            self.name,
            JobState.SUCCEEDED,
            metrics=metrics,
            fact_count=len(fact_ids),
            published=(manifest.version, fact_ids),
        )
        if not recorded:
            log.warning(
                "job %d: published %s@%d but the lease was lost meanwhile",
                job.id,
                job.pack,
                manifest.version,
            )
        log.info(
            "job %d: published %s@%d (%d facts, reliability %.2f)",
            job.id,
            job.pack,
            manifest.version,
            len(fact_ids),
            metrics.get("reliability", float("nan")),
        )
        if self.on_published is not None:
            self.on_published(job.pack, manifest.version)
