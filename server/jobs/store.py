"""The durable store of facts, jobs and published versions (SQLAlchemy 2).

SQLite (WAL) is the zero-set-up default; PostgreSQL serves several servers and workers. A job is
claimed with a lease that the worker renews while it runs; an expired lease (a worker killed
mid-job) makes the job claimable again, up to its attempt limit, after which it ends failed. Jobs
of one pack never run at once, and facts that arrive while a job runs wait for the next one
(coalesced into one queued job per pack).

On PostgreSQL the writes of one pack (submissions, deletions, claims) take the pack's advisory
lock, so a fact never joins a job whose worker has already read the pack's facts. On SQLite every
transaction is BEGIN IMMEDIATE, which serialises them all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator
from sqlalchemy import Engine, create_engine, event, func, or_, select, text, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from server.editor.facts import Fact
from server.jobs.models import (
    FactRow,
    IdempotencyKeyRow,
    JobRow,
    JobState,
    PackActivationRow,
    PackVersionRow,
)
from server.packs.live import Activation

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
ACTIVE = (JobState.QUEUED, JobState.RUNNING)
DEFAULT_MAX_ATTEMPTS = 3
# PostgreSQL advisory lock keys: migrations use the two-int key space, which never meets the
# one-bigint space of the per-pack locks (hashtext of the pack name).
_MIGRATION_LOCK = (0x4C4B53, 1)
# Alembic's `context` and `op` are module globals: one migration at a time in a process.
_ALEMBIC_LOCK = threading.Lock()


class StoreUnavailableError(Exception):
    """The database cannot be reached; nothing was written."""


class NotFoundError(Exception):
    pass


class FactConflictError(Exception):
    """A submitted fact contradicts a stored one."""


class IdempotencyKeyReusedError(Exception):
    """An Idempotency-Key already stands for another request to the same pack."""


def _extra(fact: Fact) -> dict[str, Any]:
    return fact.model_dump(exclude={"subject", "prompt", "target"}, exclude_defaults=True)


def request_hash(facts: Sequence[Fact], replace: bool) -> str:
    """What a submission asked for, whatever its spelling: the parsed facts and the flag."""
    canonical = {"facts": [f.model_dump(mode="json") for f in facts], "replace": replace}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def _worker_gone(owner: str | None) -> str:
    return f"worker {owner} stopped renewing its lease (it died, hung or lost the database)"


def now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes for what was written as UTC."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class Job(BaseModel):
    """A job as the store last saw it: what the worker runs and what `GET /v1/jobs/{id}`
    answers (the one type of a job outside the database row)."""

    model_config = ConfigDict(from_attributes=True, frozen=True)

    id: int
    pack: str
    state: str
    progress: float
    eta_seconds: float | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    fact_count: int | None
    metrics: dict[str, float]
    error: str | None
    published_version: int | None
    attempts: int
    cancel_requested: bool

    @field_validator("created_at", "started_at", "finished_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return _aware(value)

    @field_validator("metrics", mode="before")
    @classmethod
    def _copied(cls, value: dict[str, float] | None) -> dict[str, float]:
        return dict(value or {})

    @classmethod
    def of(cls, row: JobRow) -> Job:
        return cls.model_validate(row)


@dataclass(frozen=True)
class StoredFact:
    id: int
    pack: str
    fact: Fact
    job_id: int
    created_at: datetime
    live: bool = False  # the pack's latest published version applies it
    deleting: bool = False  # deleted, but still applied until a version without it is published

    @classmethod
    def of(cls, row: FactRow, in_service: frozenset[int] = frozenset()) -> StoredFact:
        fact = Fact.model_validate(
            {"subject": row.subject, "prompt": row.prompt, "target": row.target, **row.extra}
        )
        created = _aware(row.created_at)
        assert created is not None
        return cls(
            row.id,
            row.pack,
            fact,
            row.job_id,
            created,
            live=row.id in in_service,
            deleting=row.deleted_at is not None,
        )


@dataclass(frozen=True)
class Submission:
    job_id: int
    fact_ids: list[int]
    replayed: bool  # an Idempotency-Key seen before: nothing new was written


class JobStore:
    def __init__(self, url: str, clock: Callable[[], datetime] = now) -> None:
        """`clock` gives the time leases are taken and judged by (tests pass one they step)."""
        self.url = url
        self.clock = clock
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self.engine: Engine = create_engine(
                url, connect_args={"timeout": 30, "check_same_thread": False}
            )
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        else:
            self.engine = create_engine(url, pool_pre_ping=True, connect_args=_pg_connect_args())
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._migrated = False
        self._migrate_failure: tuple[float, StoreUnavailableError] | None = None

    @classmethod
    def open(cls, url: str) -> JobStore:
        """Connect and bring the schema to the latest migration (StoreUnavailableError if the
        database cannot be reached; `JobStore(url)` instead migrates on first use)."""
        store = cls(url)
        store.migrate()
        return store

    def migrate(self) -> None:
        """Upgrade to the latest revision. On PostgreSQL under an advisory lock held to the end
        of the transaction, so processes starting together on an empty database take turns: the
        first creates the schema, the others find it at head."""
        from alembic import command  # here: alembic takes ~0.5 s to import, only this needs it
        from alembic.config import Config as AlembicConfig

        config = AlembicConfig()
        config.set_main_option("script_location", str(MIGRATIONS))
        asked = time.monotonic()
        with _ALEMBIC_LOCK:
            if self._migrated:  # another thread just did
                return
            failure = self._migrate_failure
            if failure is not None and failure[0] >= asked:
                # it failed while this call waited for it: answer at once rather than each
                # waiting call sitting out its own connect timeout in turn
                raise failure[1]
            try:
                with self._guard(), self.engine.begin() as connection:
                    if not self.is_sqlite:  # SQLite: BEGIN IMMEDIATE already serialises
                        connection.execute(
                            text("SELECT pg_advisory_xact_lock(:a, :b)"),
                            {"a": _MIGRATION_LOCK[0], "b": _MIGRATION_LOCK[1]},
                        )
                    config.attributes["connection"] = connection
                    command.upgrade(config, "head")
            except StoreUnavailableError as exc:
                self._migrate_failure = (time.monotonic(), exc)
                raise
            self._migrated, self._migrate_failure = True, None

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except (OperationalError, InterfaceError) as exc:
            raise StoreUnavailableError(f"the database is unavailable: {exc.orig}") from exc
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            raise StoreUnavailableError(f"the database connection was lost: {exc.orig}") from exc

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed whole, or rolled back whole. A store that could not reach
        its database at start migrates on the first call that can (no restart needed); a pooled
        connection the server dropped is replaced before use (pool_pre_ping)."""
        if not self._migrated:
            self.migrate()
        with self._guard(), self._sessions.begin() as session:
            yield session

    def _lock_pack(self, session: Session, pack: str) -> None:
        """Serialise the pack's submissions, deletions and claims until this transaction ends
        (PostgreSQL; SQLite transactions are serial already)."""
        if not self.is_sqlite:
            session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:p))"), {"p": pack})

    @staticmethod
    def _latest_version(session: Session, pack: str) -> PackVersionRow | None:
        return session.scalars(
            select(PackVersionRow)
            .where(PackVersionRow.pack == pack)
            .order_by(PackVersionRow.version.desc())
            .limit(1)
        ).first()

    def _in_service(self, session: Session, pack: str) -> frozenset[int]:
        """The fact ids of the pack's latest published version: the edits being applied."""
        latest = self._latest_version(session, pack)
        return frozenset(latest.fact_ids) if latest is not None else frozenset()

    # -- submissions -------------------------------------------------------------------------

    def submit(
        self,
        pack: str,
        facts: Sequence[Fact],
        idempotency_key: str | None = None,
        *,
        replace: bool = False,
    ) -> Submission:
        """Store `facts` for `pack` and make sure a queued job will train them. A fact with the
        subject and prompt of a stored one but another target is a conflict, unless `replace`:
        then it supersedes the stored one. A repeated `idempotency_key` replays the first
        answer; under another request it raises IdempotencyKeyReusedError."""
        asked = request_hash(facts, replace)
        with self.session() as session:
            self._lock_pack(session, pack)
            if idempotency_key is not None:
                seen = session.get(IdempotencyKeyRow, (pack, idempotency_key))
                if seen is not None:
                    if seen.request_hash is not None and seen.request_hash != asked:
                        raise IdempotencyKeyReusedError(
                            f"Idempotency-Key {idempotency_key!r} was used for another request "
                            f"to pack {pack!r}; use a new key for new facts"
                        )
                    return Submission(seen.job_id, list(seen.fact_ids), replayed=True)
            submission = self._store_facts(session, pack, facts, idempotency_key, replace)
            if idempotency_key is not None:
                session.add(
                    IdempotencyKeyRow(
                        pack=pack,
                        key=idempotency_key,
                        request_hash=asked,
                        job_id=submission.job_id,
                        fact_ids=submission.fact_ids,
                        created_at=self.clock(),
                    )
                )
            return submission

    def _store_facts(
        self,
        session: Session,
        pack: str,
        facts: Sequence[Fact],
        idempotency_key: str | None,
        replace: bool,
    ) -> Submission:
        stored = {
            (r.subject, r.prompt): r
            for r in session.scalars(
                select(FactRow).where(FactRow.pack == pack, FactRow.deleted_at.is_(None))
            )
        }
        fresh, kept = [], []
        for number, fact in enumerate(facts):
            earlier = stored.get(fact.key)
            if earlier is None:
                fresh.append(fact)
            elif earlier.target == fact.target and earlier.extra == _extra(fact):
                kept.append(earlier.id)  # already there: nothing to train
            elif replace:
                earlier.deleted_at = self.clock()
                fresh.append(fact)
            else:
                raise FactConflictError(
                    f"fact {number}: pack {pack!r} already has fact {earlier.id} with this "
                    f"subject and prompt and target {earlier.target!r}; delete it or submit "
                    "with replace=true"
                )
        if not fresh:  # all known already: the job that trained (or will train) them...
            if self._untrained(session, pack, kept):  # ...unless it ended without them
                return Submission(self._queued_job(session, pack).id, kept, replayed=False)
            published = self._latest_version(session, pack)
            if published is not None and set(kept) <= set(published.fact_ids):
                return Submission(published.job_id, kept, replayed=False)
            latest = session.scalar(select(func.max(FactRow.job_id)).where(FactRow.id.in_(kept)))
            return Submission(int(latest or 0), kept, replayed=False)
        job = self._queued_job(session, pack)
        created = self.clock()
        rows = [
            FactRow(
                pack=pack,
                subject=f.subject,
                prompt=f.prompt,
                target=f.target,
                extra=_extra(f),
                job_id=job.id,
                idempotency_key=idempotency_key,
                created_at=created,
            )
            for f in fresh
        ]
        session.add_all(rows)
        session.flush()
        return Submission(job.id, kept + [r.id for r in rows], replayed=False)

    def _untrained(self, session: Session, pack: str, fact_ids: list[int]) -> bool:
        """Whether some of these stored facts are in no published version and their job ended
        (failed or cancelled): submitting them again must queue a job, or they never train."""
        missing = set(fact_ids) - self._in_service(session, pack)
        if not missing:
            return False
        ended = session.scalar(
            select(func.count())
            .select_from(FactRow)
            .join(JobRow, JobRow.id == FactRow.job_id)
            .where(FactRow.id.in_(missing), JobRow.state.not_in(ACTIVE))
        )
        return bool(ended)

    def _queued_job(self, session: Session, pack: str) -> JobRow:
        """The pack's queued job (new facts join it), or a new one."""
        job = session.scalars(
            select(JobRow)
            .where(JobRow.pack == pack, JobRow.state == JobState.QUEUED)
            .order_by(JobRow.id)
            .limit(1)
        ).first()
        if job is None:
            job = JobRow(
                pack=pack,
                state=JobState.QUEUED,
                created_at=self.clock(),
                progress=0.0,
                metrics={},
                attempts=0,
                cancel_requested=False,
            )
            session.add(job)
            session.flush()
        return job

    def delete_fact(self, pack: str, fact_id: int) -> int:
        """Mark a fact deleted and queue a retrain without it; returns the job id. The edit stays
        in service until a version without it is published, so deleting it again (after a
        retrain that failed) queues another retrain."""
        with self.session() as session:
            self._lock_pack(session, pack)
            row = session.get(FactRow, fact_id)
            if row is None or row.pack != pack:
                raise NotFoundError(f"pack {pack!r} has no fact {fact_id}")
            if row.deleted_at is None:
                row.deleted_at = self.clock()
            elif fact_id not in self._in_service(session, pack):
                raise NotFoundError(f"pack {pack!r} has no fact {fact_id}")
            return self._queued_job(session, pack).id

    def facts(
        self, pack: str, *, offset: int = 0, limit: int = 100
    ) -> tuple[list[StoredFact], int]:
        """The pack's facts as its users see them: every fact not deleted, and the deleted ones
        the latest published version still applies (`deleting`)."""
        with self.session() as session:
            in_service = self._in_service(session, pack)
            deleted = session.scalars(
                select(FactRow.id).where(FactRow.pack == pack, FactRow.deleted_at.is_not(None))
            ).all()
            still_applied = [i for i in deleted if i in in_service]
            shown = (
                FactRow.pack == pack,
                or_(FactRow.deleted_at.is_(None), FactRow.id.in_(still_applied)),
            )
            total = session.scalar(select(func.count()).select_from(FactRow).where(*shown)) or 0
            rows = session.scalars(
                select(FactRow).where(*shown).order_by(FactRow.id).offset(offset).limit(limit)
            ).all()
            return [StoredFact.of(r, in_service) for r in rows], total

    def live_facts(self, pack: str) -> list[StoredFact]:
        """The facts the pack's next version is trained from: all those not deleted."""
        with self.session() as session:
            rows = session.scalars(
                select(FactRow)
                .where(FactRow.pack == pack, FactRow.deleted_at.is_(None))
                .order_by(FactRow.id)
            ).all()
            return [StoredFact.of(r) for r in rows]

    # -- jobs --------------------------------------------------------------------------------

    def job(self, job_id: int) -> Job:
        with self.session() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                raise NotFoundError(f"no job {job_id}")
            return Job.of(row)

    def jobs(self, *, pack: str | None = None, limit: int = 100) -> list[Job]:
        with self.session() as session:
            query = select(JobRow).order_by(JobRow.id.desc()).limit(limit)
            if pack is not None:
                query = query.where(JobRow.pack == pack)
            return [Job.of(r) for r in session.scalars(query).all()]

    def cancel(self, job_id: int) -> Job:
        """A queued job is cancelled at once, and so is a running one whose worker is gone (its
        lease ran out); a running one at its next heartbeat, or by the next claim after its
        worker dies."""
        with self.session() as session:
            row = session.get(JobRow, job_id, with_for_update=self._row_lock)
            if row is None:
                raise NotFoundError(f"no job {job_id}")
            moment = self.clock()
            if row.state == JobState.QUEUED:
                row.state, row.finished_at = JobState.CANCELLED, moment
            elif row.state == JobState.RUNNING:
                row.cancel_requested = True
                expires = _aware(row.lease_expires_at)
                if expires is not None and expires < moment:
                    self._end_abandoned(row, moment, DEFAULT_MAX_ATTEMPTS)
            return Job.of(row)

    @property
    def _row_lock(self) -> dict[str, Any] | bool:
        """FOR NO KEY UPDATE on PostgreSQL: excludes other writers of the job row but lets facts
        and versions that reference it be inserted meanwhile (no deadlock with a submission)."""
        return False if self.is_sqlite else {"key_share": True}

    @staticmethod
    def _end_abandoned(row: JobRow, moment: datetime, max_attempts: int) -> None:
        """End a running job whose worker is gone and that must not run again: cancelled, or
        out of attempts (failed, with the last error)."""
        gone = _worker_gone(row.lease_owner)
        if row.cancel_requested:
            row.state, row.error = JobState.CANCELLED, f"cancelled; {gone}"
        else:
            row.state = JobState.FAILED
            row.error = f"attempt {row.attempts} of {max_attempts}: {gone}"
        row.finished_at, row.lease_expires_at = moment, None
        log.warning("job %d: %s; ended %s", row.id, gone, row.state)

    def claim(
        self, owner: str, lease_seconds: float, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS
    ) -> Job | None:
        """Take the oldest runnable job: queued, or running under an expired lease with attempts
        left, and of a pack with no other job running. Jobs whose worker died and that must not
        run again (cancelled, or out of attempts) are ended first."""
        moment = self.clock()
        expired = (JobRow.state == JobState.RUNNING) & (JobRow.lease_expires_at < moment)
        abandoned = select(JobRow).where(
            expired, or_(JobRow.cancel_requested.is_(True), JobRow.attempts >= max_attempts)
        )
        claimable = or_(JobRow.state == JobState.QUEUED, expired & (JobRow.attempts < max_attempts))
        busy_packs = select(JobRow.pack).where(
            JobRow.state == JobState.RUNNING, JobRow.lease_expires_at >= moment
        )
        query = (
            select(JobRow)
            .where(claimable, JobRow.pack.not_in(busy_packs), JobRow.cancel_requested.is_(False))
            .order_by(JobRow.id)
            .limit(1)
        )
        if not self.is_sqlite:  # FOR NO KEY UPDATE: see _row_lock
            abandoned = abandoned.with_for_update(skip_locked=True, key_share=True)
            query = query.with_for_update(skip_locked=True, of=JobRow, key_share=True)
        with self.session() as session:
            for stale in session.scalars(abandoned).all():
                self._end_abandoned(stale, moment, max_attempts)
            row = session.scalars(query).first()
            if row is None:
                return None
            if not self.is_sqlite:  # one claimer per pack: the pack's lock, then look again
                # Waits for a submission of this pack in flight: its facts commit before the
                # claim does, so the worker's read of the pack's facts includes them.
                self._lock_pack(session, row.pack)
                running = session.scalar(
                    select(func.count()).where(
                        JobRow.pack == row.pack,
                        JobRow.id != row.id,
                        JobRow.state == JobState.RUNNING,
                        JobRow.lease_expires_at >= moment,
                    )
                )
                if running:
                    return None
            if row.state == JobState.RUNNING:
                log.warning(
                    "job %d: lease of %s expired; reclaimed by %s", row.id, row.lease_owner, owner
                )
                row.error = f"attempt {row.attempts} of {max_attempts}: " + _worker_gone(
                    row.lease_owner
                )
            row.state = JobState.RUNNING
            row.lease_owner = owner
            row.lease_expires_at = moment + timedelta(seconds=lease_seconds)
            row.started_at = moment
            row.attempts += 1
            row.progress, row.eta_seconds = 0.0, None  # the last attempt's error stays visible
            return Job.of(row)

    def heartbeat(
        self,
        job_id: int,
        owner: str,
        lease_seconds: float,
        *,
        progress: float,
        eta_seconds: float | None,
    ) -> bool:
        """Renew the lease and record progress; False when the job is no longer ours to run
        (lease lost) or a cancel was asked for."""
        with self.session() as session:
            updated = session.execute(
                update(JobRow)
                .where(
                    JobRow.id == job_id,
                    JobRow.lease_owner == owner,
                    JobRow.state == JobState.RUNNING,
                )
                .values(
                    lease_expires_at=self.clock() + timedelta(seconds=lease_seconds),
                    progress=progress,
                    eta_seconds=eta_seconds,
                )
            )
            if updated.rowcount != 1:
                return False
            row = session.get(JobRow, job_id)
            return row is not None and not row.cancel_requested

    def finish(
        self,
        job_id: int,
        owner: str,
        state: JobState,
        *,
        metrics: dict[str, Any] | None = None,
        error: str | None = None,
        published: tuple[int, list[int]] | None = None,
        fact_count: int | None = None,
    ) -> bool:
        """End a job we hold; with `published` (version, fact ids) also record the version.
        False (and nothing written) when the lease was lost meanwhile."""
        with self.session() as session:
            row = session.get(JobRow, job_id, with_for_update=self._row_lock)
            if row is None or row.lease_owner != owner or row.state != JobState.RUNNING:
                return False
            row.state, row.finished_at = state, self.clock()
            row.metrics, row.error, row.fact_count = metrics or {}, error, fact_count
            row.lease_expires_at = None
            if state == JobState.SUCCEEDED:
                row.progress, row.eta_seconds = 1.0, 0.0
            if published is not None:
                version, fact_ids = published
                row.published_version = version
                session.add(
                    PackVersionRow(
                        pack=row.pack,
                        version=version,
                        job_id=job_id,
                        fact_ids=fact_ids,
                        metrics=metrics or {},
                        published_at=self.clock(),
                    )
                )
            return True

    def fail_attempt(
        self, job_id: int, owner: str, error: str, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS
    ) -> JobState | None:
        """An attempt we hold ended in an error: the job is queued again while it has attempts
        left, else it ends failed with this error (cancelled, if a cancel was asked for). The
        state it is left in; None (nothing written) when the lease was lost meanwhile."""
        with self.session() as session:
            row = session.get(JobRow, job_id, with_for_update=self._row_lock)
            if row is None or row.lease_owner != owner or row.state != JobState.RUNNING:
                return None
            row.error = f"attempt {row.attempts} of {max_attempts}: {error}"
            row.lease_owner, row.lease_expires_at = None, None
            if row.cancel_requested:
                row.state, row.finished_at = JobState.CANCELLED, self.clock()
            elif row.attempts >= max_attempts:
                row.state, row.finished_at = JobState.FAILED, self.clock()
            else:
                row.state, row.progress, row.eta_seconds = JobState.QUEUED, 0.0, None
            return JobState(row.state)

    def activations(self) -> dict[str, Activation]:
        """Every pack's recorded activation (the registry's `LiveVersions`)."""
        with self.session() as session:
            rows = session.scalars(select(PackActivationRow))
            return {row.pack: Activation(row.version, row.newest) for row in rows}

    def record_activation(self, name: str, activation: Activation) -> None:
        with self.session() as session:
            session.merge(
                PackActivationRow(
                    pack=name,
                    version=activation.version,
                    newest=activation.newest,
                    activated_at=self.clock(),
                )
            )

    def count_by_state(self) -> dict[str, int]:
        with self.session() as session:
            rows = session.execute(select(JobRow.state, func.count()).group_by(JobRow.state))
            return {str(state): int(count) for state, count in rows}

    def versions(self, pack: str) -> list[PackVersionRow]:
        with self.session() as session:
            return list(
                session.scalars(
                    select(PackVersionRow)
                    .where(PackVersionRow.pack == pack)
                    .order_by(PackVersionRow.version)
                ).all()
            )


def _sqlite_on_connect(connection: Any, _record: Any) -> None:
    connection.isolation_level = None  # let the "begin" listener issue BEGIN IMMEDIATE
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _pg_connect_args() -> dict[str, Any]:
    return {"connect_timeout": 5}
