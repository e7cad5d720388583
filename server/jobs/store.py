"""The durable store of facts, jobs and published versions (SQLAlchemy 2).

SQLite (WAL) is the zero-set-up default; PostgreSQL serves several servers and workers. A job is
claimed with a lease that the worker renews while it trains; an expired lease (a worker killed
mid-job) makes the job claimable again. Jobs of one pack never run at once, and facts that arrive
while a job runs wait for the next one (coalesced into one queued job per pack).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event, func, or_, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from server.jobs.models import FactRow, JobRow, JobState, PackVersionRow
from server.lks.facts import Fact

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
ACTIVE = (JobState.QUEUED, JobState.RUNNING)


class StoreUnavailableError(Exception):
    """The database cannot be reached; nothing was written."""


class NotFoundError(Exception):
    pass


class FactConflictError(Exception):
    """A submitted fact contradicts a stored one."""


def _extra(fact: Fact) -> dict[str, Any]:
    return fact.model_dump(exclude={"subject", "prompt", "target"}, exclude_defaults=True)


def now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes for what was written as UTC."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


@dataclass(frozen=True)
class JobView:
    id: int
    pack: str
    state: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: float
    eta_seconds: float | None
    fact_count: int | None
    metrics: dict[str, Any]
    error: str | None
    published_version: int | None
    attempts: int
    cancel_requested: bool
    lease_owner: str | None

    @classmethod
    def of(cls, row: JobRow) -> JobView:
        return cls(
            id=row.id,
            pack=row.pack,
            state=row.state,
            created_at=_aware(row.created_at),  # type: ignore[arg-type]
            started_at=_aware(row.started_at),
            finished_at=_aware(row.finished_at),
            progress=row.progress,
            eta_seconds=row.eta_seconds,
            fact_count=row.fact_count,
            metrics=dict(row.metrics or {}),
            error=row.error,
            published_version=row.published_version,
            attempts=row.attempts,
            cancel_requested=row.cancel_requested,
            lease_owner=row.lease_owner,
        )


@dataclass(frozen=True)
class StoredFact:
    id: int
    pack: str
    fact: Fact
    job_id: int
    created_at: datetime

    @classmethod
    def of(cls, row: FactRow) -> StoredFact:
        fact = Fact.model_validate(
            {"subject": row.subject, "prompt": row.prompt, "target": row.target, **row.extra}
        )
        return cls(row.id, row.pack, fact, row.job_id, _aware(row.created_at))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Submission:
    job_id: int
    fact_ids: list[int]
    replayed: bool  # an Idempotency-Key seen before: nothing new was written


class JobStore:
    def __init__(self, url: str) -> None:
        self.url = url
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

    @classmethod
    def open(cls, url: str) -> JobStore:
        """Connect and bring the schema to the latest migration."""
        store = cls(url)
        store.migrate()
        return store

    def migrate(self) -> None:
        config = AlembicConfig()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self._guard(), self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except OperationalError as exc:
            raise StoreUnavailableError(f"the database is unavailable: {exc.orig}") from exc

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed whole, or rolled back whole."""
        with self._guard(), self._sessions.begin() as session:
            yield session

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
        then it supersedes the stored one."""
        with self.session() as session:
            if idempotency_key is not None:
                earlier = session.scalars(
                    select(FactRow)
                    .where(FactRow.pack == pack, FactRow.idempotency_key == idempotency_key)
                    .order_by(FactRow.id)
                ).all()
                if earlier:
                    return Submission(earlier[0].job_id, [r.id for r in earlier], replayed=True)
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
                    earlier.deleted_at = now()
                    fresh.append(fact)
                else:
                    raise FactConflictError(
                        f"fact {number}: pack {pack!r} already has fact {earlier.id} with this "
                        f"subject and prompt and target {earlier.target!r}; delete it or submit "
                        "with replace=true"
                    )
            if not fresh:  # all known already: the job that trained (or will train) them
                latest = session.scalar(
                    select(func.max(FactRow.job_id)).where(FactRow.id.in_(kept))
                )
                return Submission(int(latest or 0), kept, replayed=False)
            job = self._queued_job(session, pack)
            created = now()
            rows = [
                FactRow(
                    pack=pack,
                    subject=f.subject,
                    prompt=f.prompt,
                    target=f.target,
                    extra=f.model_dump(
                        exclude={"subject", "prompt", "target"}, exclude_defaults=True
                    ),
                    job_id=job.id,
                    idempotency_key=idempotency_key,
                    created_at=created,
                )
                for f in fresh
            ]
            session.add_all(rows)
            session.flush()
            return Submission(job.id, kept + [r.id for r in rows], replayed=False)

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
                created_at=now(),
                progress=0.0,
                metrics={},
                attempts=0,
                cancel_requested=False,
            )
            session.add(job)
            session.flush()
        return job

    def delete_fact(self, pack: str, fact_id: int) -> int:
        """Mark a fact deleted and queue a retrain without it; returns the job id."""
        with self.session() as session:
            row = session.get(FactRow, fact_id)
            if row is None or row.pack != pack or row.deleted_at is not None:
                raise NotFoundError(f"pack {pack!r} has no fact {fact_id}")
            row.deleted_at = now()
            return self._queued_job(session, pack).id

    def facts(
        self, pack: str, *, offset: int = 0, limit: int = 100
    ) -> tuple[list[StoredFact], int]:
        with self.session() as session:
            live = (FactRow.pack == pack, FactRow.deleted_at.is_(None))
            total = session.scalar(select(func.count()).select_from(FactRow).where(*live)) or 0
            rows = session.scalars(
                select(FactRow).where(*live).order_by(FactRow.id).offset(offset).limit(limit)
            ).all()
            return [StoredFact.of(r) for r in rows], total

    def live_facts(self, pack: str) -> list[StoredFact]:
        with self.session() as session:
            rows = session.scalars(
                select(FactRow)
                .where(FactRow.pack == pack, FactRow.deleted_at.is_(None))
                .order_by(FactRow.id)
            ).all()
            return [StoredFact.of(r) for r in rows]

    # -- jobs --------------------------------------------------------------------------------

    def job(self, job_id: int) -> JobView:
        with self.session() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                raise NotFoundError(f"no job {job_id}")
            return JobView.of(row)

    def jobs(self, *, pack: str | None = None, limit: int = 100) -> list[JobView]:
        with self.session() as session:
            query = select(JobRow).order_by(JobRow.id.desc()).limit(limit)
            if pack is not None:
                query = query.where(JobRow.pack == pack)
            return [JobView.of(r) for r in session.scalars(query).all()]

    def cancel(self, job_id: int) -> JobView:
        """A queued job is cancelled at once; a running one at its next heartbeat."""
        with self.session() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                raise NotFoundError(f"no job {job_id}")
            if row.state == JobState.QUEUED:
                row.state, row.finished_at = JobState.CANCELLED, now()
            elif row.state == JobState.RUNNING:
                row.cancel_requested = True
            return JobView.of(row)

    def claim(self, owner: str, lease_seconds: float) -> JobView | None:
        """Take the oldest runnable job: queued, or running under an expired lease, and of a
        pack with no other job running."""
        moment = now()
        expired = (JobRow.state == JobState.RUNNING) & (JobRow.lease_expires_at < moment)
        claimable = or_(JobRow.state == JobState.QUEUED, expired)
        busy_packs = select(JobRow.pack).where(
            JobRow.state == JobState.RUNNING, JobRow.lease_expires_at >= moment
        )
        query = (
            select(JobRow)
            .where(claimable, JobRow.pack.not_in(busy_packs), JobRow.cancel_requested.is_(False))
            .order_by(JobRow.id)
            .limit(1)
        )
        if not self.is_sqlite:
            query = query.with_for_update(skip_locked=True, of=JobRow)
        with self.session() as session:
            row = session.scalars(query).first()
            if row is None:
                return None
            if not self.is_sqlite:  # one claimer per pack: the pack's lock, then look again
                session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:p))"), {"p": row.pack})
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
            row.state = JobState.RUNNING
            row.lease_owner = owner
            row.lease_expires_at = moment + timedelta(seconds=lease_seconds)
            row.started_at = moment
            row.attempts += 1
            row.progress, row.eta_seconds, row.error = 0.0, None, None
            return JobView.of(row)

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
                    lease_expires_at=now() + timedelta(seconds=lease_seconds),
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
            row = session.get(JobRow, job_id)
            if row is None or row.lease_owner != owner or row.state != JobState.RUNNING:
                return False
            row.state, row.finished_at = state, now()
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
                        published_at=now(),
                    )
                )
            return True

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
