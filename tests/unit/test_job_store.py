"""The job store on SQLite and PostgreSQL: coalescing, idempotency, conflicts, leases, per-pack
serialisation, cancellation, attempts, publishing records; and on PostgreSQL the races (made to
happen on cue by another session holding a lock), migrations of processes starting together, a
database that goes away and comes back."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from jobs_db import (
    database_url,
    holding,
    later_database,
    sessions_waiting_on_locks,
    terminate_sessions,
    wait_for,
)

from server.editor.facts import Fact
from server.jobs.models import JobState
from server.jobs.store import (
    FactConflictError,
    JobStore,
    NotFoundError,
    StoreUnavailableError,
    now,
)


class SteppedClock:
    """Wall time plus whatever a test has stepped it on: leases run out on cue, however slow
    the machine running the test is."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return now() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> SteppedClock:
    return SteppedClock()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: SteppedClock
) -> Iterator[JobStore]:
    with database_url(request.param, tmp_path) as url:
        opened = JobStore(url, clock=clock)
        opened.migrate()
        try:
            yield opened
        finally:
            opened.close()


def fact(subject: str, target: str = "Paris", **extra: object) -> Fact:
    return Fact(subject=subject, prompt=f"{subject} lives in", target=target, **extra)  # type: ignore[arg-type]


def test_submissions_coalesce_into_one_queued_job(store: JobStore) -> None:
    first = store.submit("p", [fact("Ann"), fact("Bob")])
    second = store.submit("p", [fact("Cid")])
    other = store.submit("q", [fact("Ann")])
    assert first.job_id == second.job_id != other.job_id
    assert len(first.fact_ids) == 2 and len(second.fact_ids) == 1
    assert [j.state for j in store.jobs(pack="p")] == [JobState.QUEUED]
    facts, total = store.facts("p", limit=2)
    assert total == 3 and [f.fact.subject for f in facts] == ["Ann", "Bob"]
    assert store.facts("p", offset=2)[0][0].fact.subject == "Cid"


def test_idempotency_key_conflicts_and_replacement(store: JobStore) -> None:
    first = store.submit("p", [fact("Ann")], idempotency_key="k1")
    again = store.submit("p", [fact("Ann")], idempotency_key="k1")
    assert again.replayed and again.fact_ids == first.fact_ids
    same = store.submit("p", [fact("Ann")])
    assert same.fact_ids == first.fact_ids, "an exact repeat is the same fact"
    with pytest.raises(FactConflictError, match="replace=true"):
        store.submit("p", [fact("Ann", "Rome")])
    replaced = store.submit("p", [fact("Ann", "Rome")], replace=True)
    facts, total = store.facts("p")
    assert total == 1 and facts[0].id == replaced.fact_ids[0] and facts[0].fact.target == "Rome"


def test_claim_lease_expiry_and_reclaim(store: JobStore, clock: SteppedClock) -> None:
    job_id = store.submit("p", [fact("Ann")]).job_id
    store.submit("q", [fact("Bob")])
    claimed = store.claim("w1", lease_seconds=30)
    assert claimed is not None and claimed.id == job_id and claimed.state == JobState.RUNNING
    later = store.submit("p", [fact("Cid")])  # arrives while p runs: a new queued job
    assert later.job_id != job_id
    other = store.claim("w2", lease_seconds=300)
    assert other is not None and other.pack == "q", "p is busy; q's job is next"
    assert store.claim("w2", lease_seconds=300) is None, "p's queued job waits for p's running one"
    assert store.heartbeat(job_id, "w1", 30, progress=0.5, eta_seconds=3.0)
    assert store.job(job_id).progress == 0.5
    clock.advance(29)
    assert store.claim("w3", lease_seconds=30) is None, "the renewed lease still holds"
    clock.advance(2)  # w1 died: its lease runs out
    reclaimed = store.claim("w3", lease_seconds=30)
    assert reclaimed is not None and reclaimed.id == job_id and reclaimed.attempts == 2
    assert not store.heartbeat(job_id, "w1", 30, progress=0.6, eta_seconds=None)
    assert not store.finish(job_id, "w1", JobState.SUCCEEDED), "a lost lease writes nothing"
    assert store.finish(job_id, "w3", JobState.SUCCEEDED, published=(1, [1]), fact_count=1)
    done = store.job(job_id)
    assert done.state == JobState.SUCCEEDED and done.published_version == 1
    assert [(v.version, v.fact_ids) for v in store.versions("p")] == [(1, [1])]
    nxt = store.claim("w3", lease_seconds=30)
    assert nxt is not None and nxt.id == later.job_id


def test_cancel_and_delete(store: JobStore) -> None:
    sub = store.submit("p", [fact("Ann"), fact("Bob")])
    assert store.cancel(sub.job_id).state == JobState.CANCELLED
    with pytest.raises(NotFoundError):
        store.cancel(999)
    retrain = store.delete_fact("p", sub.fact_ids[0])
    assert retrain != sub.job_id and store.job(retrain).state == JobState.QUEUED
    assert [f.fact.subject for f in store.live_facts("p")] == ["Bob"]
    with pytest.raises(NotFoundError):
        store.delete_fact("p", sub.fact_ids[0])
    running = store.claim("w", lease_seconds=30)
    assert running is not None
    store.cancel(running.id)
    assert not store.heartbeat(running.id, "w", 30, progress=0.1, eta_seconds=None)


def test_concurrent_claims_never_share_a_job_or_a_pack(store: JobStore) -> None:
    for pack in ("a", "b", "c"):
        store.submit(pack, [fact("Ann")])
        store.claim("setup", lease_seconds=30)  # make each pack's first job running...
    for pack in ("a", "b", "c"):
        store.submit(pack, [fact("Bob")])  # ...so each has a queued follower too
    for job in store.jobs():
        if job.state == JobState.RUNNING:
            store.finish(job.id, "setup", JobState.SUCCEEDED)
    claims: list[object] = []
    barrier = threading.Barrier(6)

    def claim(owner: str) -> None:
        barrier.wait()
        claims.append(store.claim(owner, lease_seconds=30))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    got = [c for c in claims if c is not None]
    assert len(got) == 3
    assert len({c.id for c in got}) == 3 and {c.pack for c in got} == {"a", "b", "c"}  # type: ignore[attr-defined]


def test_a_key_reused_for_another_request_is_refused(store: JobStore) -> None:
    from server.jobs.store import IdempotencyKeyReusedError

    first = store.submit("p", [fact("Ann")], idempotency_key="k")
    assert store.submit("p", [fact("Ann")], idempotency_key="k").fact_ids == first.fact_ids
    with pytest.raises(IdempotencyKeyReusedError, match="another request"):
        store.submit("p", [fact("Bob")], idempotency_key="k")
    with pytest.raises(IdempotencyKeyReusedError):
        store.submit("p", [fact("Ann")], idempotency_key="k", replace=True)
    assert store.facts("p")[1] == 1, "nothing of the refused requests was written"
    other_pack = store.submit("q", [fact("Bob")], idempotency_key="k")  # keys are per pack
    assert not other_pack.replayed
    known = store.submit("p", [fact("Ann")], idempotency_key="k2")  # nothing new to store...
    assert known.fact_ids == first.fact_ids
    with pytest.raises(IdempotencyKeyReusedError):  # ...and the key is taken all the same
        store.submit("p", [fact("Cid")], idempotency_key="k2")


def test_facts_whose_job_ended_without_them_get_a_job_when_sent_again(store: JobStore) -> None:
    first = store.submit("p", [fact("Ann")])
    store.cancel(first.job_id)
    again = store.submit("p", [fact("Ann")])
    assert again.fact_ids == first.fact_ids, "the stored fact, not a copy"
    assert again.job_id != first.job_id and store.job(again.job_id).state == JobState.QUEUED
    claimed = store.claim("w", lease_seconds=30)
    assert claimed is not None and claimed.id == again.job_id
    store.finish(claimed.id, "w", JobState.SUCCEEDED, published=(1, first.fact_ids))
    published = store.submit("p", [fact("Ann")])  # in the live version: nothing to do
    assert published.job_id == claimed.id and [j.state for j in store.jobs()] == [
        JobState.SUCCEEDED,
        JobState.CANCELLED,
    ]


def test_a_job_whose_workers_keep_dying_ends_failed(store: JobStore, clock: SteppedClock) -> None:
    job_id = store.submit("p", [fact("Ann")]).job_id
    for attempt in (1, 2, 3):  # each worker dies: its lease runs out, the next one reclaims
        claimed = store.claim(f"w{attempt}", lease_seconds=30)
        assert claimed is not None and claimed.id == job_id and claimed.attempts == attempt
        clock.advance(31)
    assert store.claim("w4", lease_seconds=30) is None
    job = store.job(job_id)
    assert job.state == JobState.FAILED
    assert job.attempts == 3 and job.finished_at is not None
    assert "attempt 3 of 3" in (job.error or "") and "worker w3" in (job.error or "")


def test_a_cancelled_job_whose_worker_died_ends_cancelled(
    store: JobStore, clock: SteppedClock
) -> None:
    job = store.submit("p", [fact("Ann")])
    claimed = store.claim("w1", lease_seconds=30)
    assert claimed is not None
    asked = store.cancel(job.job_id)  # the worker would stop at its next heartbeat, but dies
    assert asked.state == JobState.RUNNING and asked.cancel_requested
    clock.advance(31)
    assert store.claim("w2", lease_seconds=30) is None
    assert store.job(job.job_id).state == JobState.CANCELLED, "cancelled once its lease ran out"
    later = store.submit("p", [fact("Bob")]).job_id
    assert store.claim("w2", lease_seconds=30) is not None
    clock.advance(31)
    cancelled = store.cancel(later)  # its worker is gone: cancelled at once
    assert cancelled.state == JobState.CANCELLED and cancelled.finished_at is not None


def test_keys_recorded_before_the_key_table_still_replay(tmp_path: Path) -> None:
    """Migration 0002 carries the keys of a 0001 database into the key table."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from server.jobs.models import IdempotencyKeyRow
    from server.jobs.store import MIGRATIONS

    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = JobStore(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(
            text(
                "INSERT INTO jobs (id, pack, state, created_at, progress, metrics, attempts, "
                "cancel_requested) VALUES (7, 'p', 'succeeded', '2024-01-01', 1, '{}', 1, 0)"
            )
        )
        for fact_id, subject in ((3, "Ann"), (4, "Bob")):
            connection.execute(
                text(
                    "INSERT INTO facts (id, pack, subject, prompt, target, extra, job_id, "
                    "idempotency_key, created_at) VALUES (:id, 'p', :s, :s || ' lives in', "
                    "'Paris', '{}', 7, 'old', '2024-01-01')"
                ),
                {"id": fact_id, "s": subject},
            )
    store.migrate()
    replay = store.submit("p", [fact("Cid")], idempotency_key="old")  # body unknown: replayed
    assert replay.replayed and (replay.job_id, replay.fact_ids) == (7, [3, 4])
    with store.session() as session:
        row = session.get(IdempotencyKeyRow, ("p", "old"))
        assert row is not None and row.request_hash is None
    store.close()


# -- PostgreSQL: races on cue, migrations together, a database that comes back --------------


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    with database_url("postgresql", tmp_path) as url:
        yield url


def test_a_fact_never_joins_a_job_whose_facts_were_already_read(pg_url: str) -> None:
    """A submission racing a claim: its facts either reach the claimed job before the worker
    reads the pack's facts, or go to a new queued job; never to a job that runs without them."""
    store = JobStore.open(pg_url)
    first = store.submit("p", [fact("Ann")])
    with ThreadPoolExecutor(2) as pool:
        # the submission stalls between choosing its job and writing its fact
        with holding(pg_url, "LOCK TABLE facts IN SHARE MODE"):
            submitted = pool.submit(store.submit, "p", [fact("Bob")])
            wait_for(lambda: sessions_waiting_on_locks(pg_url) == 1, what="the stalled write")

            def claim_and_read() -> tuple[object, set[int]]:
                job = store.claim("w", lease_seconds=30)
                return job, {f.id for f in store.live_facts("p")}  # what the worker trains

            claimed = pool.submit(claim_and_read)
            wait_for(
                lambda: claimed.done() or sessions_waiting_on_locks(pg_url) == 2,
                what="the claim done or waiting",
            )
        bob = submitted.result(timeout=30)
        job, read = claimed.result(timeout=30)
    assert job is not None and job.id == first.job_id  # type: ignore[attr-defined]
    if bob.job_id == first.job_id:
        assert set(bob.fact_ids) <= read, "the job runs without a fact it answered 202 for"
    else:
        assert store.job(bob.job_id).state == JobState.QUEUED
    store.close()


def test_retries_racing_under_one_key_store_the_facts_once(pg_url: str) -> None:
    store = JobStore.open(pg_url)
    with ThreadPoolExecutor(2) as pool:
        with holding(pg_url, "LOCK TABLE facts IN SHARE MODE"):
            tries = [pool.submit(store.submit, "p", [fact("Ann")], "k") for _ in range(2)]
            wait_for(lambda: sessions_waiting_on_locks(pg_url) == 2, what="both tries waiting")
        answers = [t.result(timeout=30) for t in tries]
    assert answers[0].fact_ids == answers[1].fact_ids
    assert sorted(a.replayed for a in answers) == [False, True]
    assert store.facts("p")[1] == 1
    store.close()


def test_processes_starting_together_on_an_empty_database_both_come_up(pg_url: str) -> None:
    """A server and a worker process migrating one empty database at once: one creates the
    schema, the other waits for it and finds it done. (Another session's uncommitted table of
    the same name holds both at the same point of the migration, so they collide there on
    cue.)"""
    opening = "import sys; from server.jobs.store import JobStore; JobStore.open(sys.argv[1])"
    with holding(pg_url, "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"):
        processes = [
            subprocess.Popen([sys.executable, "-c", opening, pg_url], stderr=subprocess.PIPE)
            for _ in range(2)
        ]
        try:
            wait_for(lambda: sessions_waiting_on_locks(pg_url) == 2, what="both migrations")
        except AssertionError:
            for process in processes:
                process.kill()
            raise
    errors = [process.communicate(timeout=60)[1].decode() for process in processes]
    assert [process.returncode for process in processes] == [0, 0], errors
    store = JobStore.open(pg_url)
    assert store.jobs() == []
    store.close()


def test_the_store_comes_back_with_its_database(tmp_path: Path) -> None:
    with later_database(tmp_path) as (url, create):
        store = JobStore(url)  # the database is not there yet: as if it were down at start
        with pytest.raises(StoreUnavailableError):
            store.submit("p", [fact("Ann")])
        create()  # it comes back: the same store migrates and serves, no restart
        first = store.submit("p", [fact("Ann")])
        assert terminate_sessions(url) >= 1  # a restart or a failover drops every connection
        assert store.job(first.job_id).state == JobState.QUEUED
        assert store.submit("p", [fact("Bob")]).job_id == first.job_id
        store.close()
