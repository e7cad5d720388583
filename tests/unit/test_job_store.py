"""The job store on SQLite and PostgreSQL: coalescing, idempotency, conflicts, leases, per-pack
serialisation, cancellation, publishing records."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jobs_db import database_url

from server.jobs.models import JobState
from server.jobs.store import FactConflictError, JobStore, NotFoundError
from server.lks.facts import Fact


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    with database_url(request.param, tmp_path) as url:
        opened = JobStore.open(url)
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


def test_claim_lease_expiry_and_reclaim(store: JobStore) -> None:
    job_id = store.submit("p", [fact("Ann")]).job_id
    store.submit("q", [fact("Bob")])
    claimed = store.claim("w1", lease_seconds=0.5)
    assert claimed is not None and claimed.id == job_id and claimed.state == JobState.RUNNING
    later = store.submit("p", [fact("Cid")])  # arrives while p runs: a new queued job
    assert later.job_id != job_id
    other = store.claim("w2", lease_seconds=30)
    assert other is not None and other.pack == "q", "p is busy; q's job is next"
    assert store.claim("w2", lease_seconds=30) is None, "p's queued job waits for p's running one"
    assert store.heartbeat(job_id, "w1", 0.5, progress=0.5, eta_seconds=3.0)
    assert store.job(job_id).progress == 0.5
    time.sleep(0.7)  # w1 died: its lease runs out
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
