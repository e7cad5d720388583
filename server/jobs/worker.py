"""The worker: claim a job, train the pack's whole current fact set, check the result, publish.

A version is published only when it passes the quality gate (reliability on its own facts;
locality on the facts' own locality prompts where they have any); a pack whose last fact was
deleted gets a version with no edits. Publishing is ordered so that a crash at any point leaves
every fact and every published pack intact: the pack directory is written whole and renamed into
place, then the database records it, then the server is told.

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
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from server.jobs.models import JobState
from server.jobs.store import DEFAULT_MAX_ATTEMPTS, JobStore, JobView, StoreUnavailableError
from server.lks.apply import EditSet
from server.lks.editor import KnownParts, backbone_info, pack_content, train_edits
from server.lks.evaluate import EvalItem, evaluate, top1_predictions
from server.lks.facts import Fact, FactKey, fact_key
from server.lks.gate import PLACEHOLDER, STATEMENT_PROBES, SentenceEncoder
from server.lks.scope import Scope
from server.lks.train import (
    DEFAULT_CACHE_BUDGET_BYTES,
    Progress,
    TrainConfig,
    growth_selection,
)
from server.model.backbone import Backbone
from server.packs import PackError, PackRef
from server.packs.format import BLOCKS_KEY, PackContent
from server.packs.store import PackStore
from server.settings import Settings

log = logging.getLogger(__name__)

PublishedCallback = Callable[[str, int], None]
LOCALITY_PROBE_TARGET = " the"  # one token: compares the predictions right after the prompt


class JobCancelledError(Exception):
    """The job was cancelled or its lease was lost: stop training, publish nothing."""


@dataclass(frozen=True)
class WorkerConfig:
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 2.0
    poll_seconds: float = 0.5
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    min_reliability: float = 0.9
    min_locality: float = 0.8  # on the facts' own locality prompts and on held-out probes
    probe_limit: int = 120
    # Growth that reuses the previous version's blocks checks the new or changed subjects' facts
    # and this many of the unchanged ones (their blocks and gate rows are bit-identical).
    growth_check_sample: int = 256
    train: TrainConfig = field(default_factory=TrainConfig)
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerConfig:
        return cls(
            lease_seconds=settings.job_lease_seconds,
            max_attempts=settings.job_max_attempts,
            min_reliability=settings.publish_min_reliability,
            min_locality=settings.publish_min_locality,
            cache_budget_bytes=settings.train_cache_mb << 20,
        )


def release_freed_memory() -> None:
    """Hand the heap a finished job freed back to the OS: glibc keeps it otherwise, and a
    server that trains now and then would grow with every job."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def facts_to_check(
    facts: Sequence[Fact], scope: Scope, known: KnownParts, sample: int, seed: int = 0
) -> list[Fact]:
    """The quality gate's facts when the previous version's blocks were reused: every fact of a
    new or changed subject, and a seeded sample of the rest, whose blocks and gate rows are the
    ones the previous version was checked with. A 10,000-fact pack grown by 100 facts checks
    ~360 facts, not 10,100."""
    reused = [scope.feature_texts[row] in known.blocks for row in scope.fact_rows]
    changed = [f for f, was in zip(facts, reused, strict=True) if not was]
    unchanged = [f for f, was in zip(facts, reused, strict=True) if was]
    return changed + random.Random(seed).sample(unchanged, min(sample, len(unchanged)))


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
        on_published: PublishedCallback | None = None,
        on_finished: Callable[[bool, float], None] | None = None,
        name: str | None = None,
    ) -> None:
        self.store = store
        self.packs = packs
        self.backbone = backbone
        self.config = config
        self.encoder_factory = encoder_factory
        self.on_published = on_published
        self.on_finished = on_finished  # (succeeded, seconds): metrics
        self.name = name or worker_name()
        self._encoder: SentenceEncoder | None = None

    def run_forever(self, stop: threading.Event) -> None:
        log.info("worker %s started", self.name)
        while not stop.is_set():
            try:
                worked = self.run_once()
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

    def _run(self, job: JobView, lease: JobLease) -> bool:
        stored = self.store.live_facts(job.pack)
        if not stored:
            return self._publish_empty(job, lease)
        facts = [s.fact for s in stored]

        def on_progress(event: Progress) -> None:
            eta = event.eta_s if event.eta_s == event.eta_s else None  # NaN: unknown yet
            lease.report(0.9 * event.fraction, eta)  # the last 10%: checking and publishing

        warm, learned, known = self._warm_start(job.pack, facts)
        # A grown set first tries the previous hypernetwork as it is (it reads new targets from
        # the feature texts, and earlier facts keep their blocks), then trains on the new facts
        # plus a replay sample of the learned ones.
        plans: list[tuple[bool, list[int] | None]] = [(False, None)]  # (apply_only, train_on)
        if warm is not None:
            plans = [(True, None), (False, growth_selection(facts, learned))]
        for apply_only, train_on in plans:
            result, gate_table, edit_set = train_edits(
                self.backbone,
                facts,
                self._encoder_once(),
                self.config.train,
                on_progress,
                warm_start=warm,
                train_on=train_on,
                apply_only=apply_only,
                known=known,
                cache_budget_bytes=self.config.cache_budget_bytes,
            )
            trained = 0 if apply_only else len(facts) if train_on is None else len(train_on)
            checked = (
                facts_to_check(facts, result.scope, known, self.config.growth_check_sample)
                if apply_only
                else facts
            )
            lease.report(0.9)
            metrics = {
                **self._check(checked, edit_set),
                "warm_start": 1.0 if warm is not None else 0.0,
                "trained_facts": float(trained),
                "checked_facts": float(len(checked)),
            }
            passed = (
                metrics["reliability"] >= self.config.min_reliability
                and metrics.get("locality", 1.0) >= self.config.min_locality
                and metrics["probe_locality"] >= self.config.min_locality
            )
            if passed:
                break
            if apply_only:
                log.info("pack %s: the previous weights miss the gate; training", job.pack)
        if not passed:
            self.store.finish(
                job.id,
                self.name,
                JobState.FAILED,
                metrics=metrics,
                fact_count=len(facts),
                error=f"quality gate: reliability {metrics['reliability']:.2f} "
                f"(min {self.config.min_reliability}), locality "
                f"{metrics.get('locality', float('nan')):.2f} and on held-out probes "
                f"{metrics['probe_locality']:.2f} (min {self.config.min_locality}); the live "
                "version stays",
            )
            return False
        lease.report(0.95)  # last chance to cancel before anything is written
        content = pack_content(result, gate_table, facts, metrics)
        self._publish(job, content, metrics, [s.id for s in stored])
        return True

    def _publish_empty(self, job: JobView, lease: JobLease) -> bool:
        """Every fact was deleted: a version with no edits takes the last ones out of service
        (a pack never published has nothing to take out, and gets no version)."""
        lease.check()
        if not self.packs.versions(job.pack):
            self.store.finish(job.id, self.name, JobState.SUCCEEDED, metrics={}, fact_count=0)
            log.info("job %d: pack %s has no facts and no version; nothing to do", job.id, job.pack)
            return True
        layer = self.config.train.resolve_layer(self.backbone.num_layers)
        self._publish(job, empty_content(layer, self.backbone.hidden_size), {}, [])
        return True

    def _publish(
        self, job: JobView, content: PackContent, metrics: dict[str, float], fact_ids: list[int]
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

    def _warm_start(
        self, pack: str, facts: list[Fact]
    ) -> tuple[dict[str, torch.Tensor] | None, set[FactKey], KnownParts]:
        """The latest version's hypernetwork, the facts it learned and the parts it computed,
        when every one of those facts is still wanted (the fact set only grew) and it was
        trained on this backbone with the same shape."""
        versions = self.packs.versions(pack)
        nothing: tuple[None, set[FactKey], KnownParts] = (None, set(), KnownParts())
        if not versions:
            return nothing
        try:
            previous = self.packs.load(PackRef(pack, versions[-1]))
        except PackError as exc:
            log.warning("pack %s@%d unreadable, training from scratch: %s", pack, versions[-1], exc)
            return nothing
        wanted = {fact_key(f) for f in facts}
        learned = {fact_key(f) for f in previous.content.facts}
        compatible = (
            previous.manifest.backbone.fingerprint == self.backbone.fingerprint
            and previous.content.layer == self.config.train.resolve_layer(self.backbone.num_layers)
            and previous.content.training.get("hypernet") == self.config.train.hypernet
        )
        if not compatible or not learned or not learned <= wanted:  # an empty version: no weights
            return nothing
        log.info(
            "pack %s: warm start from version %d (%d of %d facts learned)",
            pack,
            versions[-1],
            len(learned),
            len(wanted),
        )
        return previous.content.hypernet, learned, KnownParts.from_content(previous.content)

    def _check(self, facts: list[Fact], edit_set: EditSet) -> dict[str, float]:
        """The quality gate's figures: reliability on the pack's own facts (teacher-forced
        top-1), and locality as the share of the facts' locality prompts whose next-token
        prediction the edit leaves unchanged (only when the facts carry any)."""
        items = [EvalItem(fact) for fact in facts]
        items += [
            EvalItem(fact, locality_prompt=local.prompt, locality_target=LOCALITY_PROBE_TARGET)
            for fact in facts
            for local in fact.locality
        ]
        metrics = evaluate(self.backbone, items, edit_set, fluency=False, generations=False)
        metrics["probe_locality"] = self._probe_locality(facts, edit_set)
        return {k: round(v, 4) for k, v in metrics.items() if v == v}  # NaN: nothing to measure

    def _probe_locality(self, facts: list[Fact], edit_set: EditSet) -> float:
        """Held-out locality: generic prompts about OTHER relations of the edited subjects
        ("X was born in", ...), which training never saw; the share whose next-token prediction
        the pack leaves unchanged. A sample of at most `probe_limit`, seeded."""
        rng = random.Random(0)
        subjects = sorted({f.subject for f in facts})
        pairs = [(s, p) for s in subjects for p in STATEMENT_PROBES]
        prompts = [
            p.replace(PLACEHOLDER, s)
            for s, p in rng.sample(pairs, min(len(pairs), self.config.probe_limit))
        ]
        tokenizer = self.backbone.tokenizer
        sequences = edit_set.encode_all(tokenizer, [(p, LOCALITY_PROBE_TARGET) for p in prompts])
        edited = top1_predictions(self.backbone, sequences, edit_set)
        unedited = top1_predictions(self.backbone, sequences, None)
        return sum(e == u for e, u in zip(edited, unedited, strict=True)) / max(len(prompts), 1)
