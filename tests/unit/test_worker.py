"""The worker on a tiny model with the real gate encoder: train, check, publish; a failed
quality gate publishes nothing; a worker killed mid-job has its job reclaimed and finished; the
lease holds through any step; failed attempts end in a failed job; deletions take edits out of
service only through a published version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from factories import TINY_FACTS, TINY_TRAIN

from server.builder.version import BuildPolicy
from server.editor.facts import Fact
from server.gate.encoder import SentenceEncoder
from server.jobs.models import JobState
from server.jobs.store import JobStore, NotFoundError
from server.jobs.worker import Worker, WorkerConfig
from server.model import Backbone, load_backbone
from server.packs import PackRef, PackStore
from server.packs.edit_set import plan_edits
from server.packs.registry import PackRegistry
from server.settings import Settings

FACTS, TRAIN = TINY_FACTS, TINY_TRAIN


@pytest.fixture(scope="module")
def backbone(tiny_model_dirs: dict[str, Path]) -> Backbone:
    return load_backbone(Settings(model=tiny_model_dirs["llama"], device="cpu"))


def make_worker(store: JobStore, packs: PackStore, backbone: Backbone, **policy: float) -> Worker:
    """A worker on the tiny model; `policy` sets its build policy (`min_reliability=...`)."""
    config = WorkerConfig(build=BuildPolicy(train=TRAIN, **policy))  # type: ignore[arg-type]
    return Worker(store, packs, backbone, config, name="w")


def worker_env(models: dict[str, Path], url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of an `lks worker` process on the tiny model and a test database."""
    return {
        **os.environ,
        "LKS_MODEL": str(models["llama"]),
        "LKS_DATABASE_URL": url,
        "LKS_PACKS_DIR": str(tmp_path / "packs"),
        "LKS_LOG_LEVEL": "warning",
        **extra,
    }


def test_a_job_trains_checks_and_publishes(backbone: Backbone, tmp_path: Path) -> None:
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    packs = PackStore(tmp_path / "packs")
    published: list[tuple[str, int]] = []
    worker = make_worker(store, packs, backbone, min_reliability=1.0)
    worker.on_published = lambda name, version: published.append((name, version))
    submission = store.submit("demo", FACTS)
    assert worker.run_once()
    job = store.job(submission.job_id)
    assert job.state == JobState.SUCCEEDED, job.error
    assert job.published_version == 1 and published == [("demo", 1)]
    assert job.metrics["reliability"] == 1.0 and job.progress == 1.0
    assert 0.0 <= job.metrics["probe_locality"] <= 1.0
    pack = packs.load(PackRef("demo", 1))
    assert [f["subject"] for f in pack.content.facts] == ["danielle darrieux", "france"]
    assert [v.fact_ids for v in store.versions("demo")] == [submission.fact_ids]
    assert not worker.run_once(), "nothing left to do"


def test_a_worker_loads_its_training_backbone_once_at_its_first_job(
    backbone: Backbone, tmp_path: Path
) -> None:
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    loads: list[Backbone] = []

    def training_copy() -> Backbone:
        loads.append(backbone)
        return backbone

    worker = make_worker(store, PackStore(tmp_path / "packs"), backbone)
    worker.training_factory = training_copy
    assert not worker.run_once() and loads == [], "no job, no second copy of the weights"
    for fact in FACTS:
        store.submit("demo", [fact])
        assert worker.run_once()
    assert [job.state for job in store.jobs(pack="demo")] == [JobState.SUCCEEDED] * len(FACTS)
    assert len(loads) == 1


def test_an_in_process_worker_trains_each_job_on_a_thread_that_ends_with_it(
    backbone: Backbone, tmp_path: Path
) -> None:
    """In `lks serve` the worker shares the process with the engine: a training job's CPU
    threads must end with the job (server/model/threads.py), so each job runs on its own
    thread, which is gone once the job is published."""
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    worker = make_worker(store, PackStore(tmp_path / "packs"), backbone, min_reliability=0.0)
    ran_on: list[threading.Thread] = []
    stop = threading.Event()

    def published(_name: str, _version: int) -> None:
        ran_on.append(threading.current_thread())
        stop.set()

    worker.on_published = published
    store.submit("demo", FACTS)
    loop = threading.Thread(
        target=worker.run_forever, args=(stop,), kwargs={"thread_per_job": True}
    )
    loop.start()
    loop.join(timeout=120)
    assert not loop.is_alive() and len(ran_on) == 1
    assert ran_on[0] is not loop and ran_on[0].name.startswith("lks-job-")
    assert not ran_on[0].is_alive()
    assert store.jobs()[0].state == JobState.SUCCEEDED


def test_a_failed_quality_gate_publishes_nothing(backbone: Backbone, tmp_path: Path) -> None:
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    packs = PackStore(tmp_path / "packs")
    job_id = store.submit("demo", FACTS).job_id
    assert make_worker(store, packs, backbone, min_reliability=1.01).run_once()
    job = store.job(job_id)
    assert job.state == JobState.FAILED and "quality gate" in (job.error or "")
    assert "reliability" in job.metrics and "held-out probes" in (job.error or "")
    assert packs.versions("demo") == []


def test_a_killed_worker_s_job_is_reclaimed_and_finished(
    tiny_model_dirs: dict[str, Path], backbone: Backbone, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    store = JobStore.open(url)
    packs = PackStore(tmp_path / "packs")
    facts = [Fact(subject=f"city{i}", prompt=f"city{i} is in", target="france") for i in range(1)]
    job_id = store.submit("demo", [*FACTS, *facts]).job_id
    env = worker_env(tiny_model_dirs, url, tmp_path, LKS_JOB_LEASE_SECONDS="2")
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "worker", "--once"], env=env)
    deadline = time.monotonic() + 60
    while store.job(job_id).state != JobState.RUNNING:
        assert time.monotonic() < deadline and process.poll() is None, "the worker never started"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)  # kill -9 mid-job: no chance to clean up
    process.wait()
    assert store.job(job_id).state == JobState.RUNNING, "the dead worker still holds the job"
    assert packs.versions("demo") == [], "no half pack is visible"
    # no worker may take the job while its lease (2 s) holds; once it runs out, one does
    rescuer = make_worker(store, packs, backbone, min_reliability=0.0)
    assert not rescuer.run_once(), "the job was taken while its lease still held"
    deadline = time.monotonic() + 60
    while not rescuer.run_once():
        assert time.monotonic() < deadline, "the dead worker's job was never reclaimed"
        time.sleep(0.05)
    job = store.job(job_id)
    assert job.state == JobState.SUCCEEDED and job.attempts == 2
    assert packs.versions("demo") == [1]
    assert len(store.live_facts("demo")) == 3, "no fact lost"


def test_a_grown_fact_set_warm_starts_and_a_shrunk_one_does_not(
    backbone: Backbone, tmp_path: Path
) -> None:
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    packs = PackStore(tmp_path / "packs")
    worker = make_worker(store, packs, backbone, min_reliability=0.0, growth_check_sample=0)
    first = store.submit("demo", FACTS[:1])
    assert worker.run_once()
    assert store.job(first.job_id).metrics["warm_start"] == 0.0
    grown = store.submit("demo", FACTS[1:])
    assert worker.run_once()
    job = store.job(grown.job_id)
    assert job.published_version == 2 and job.metrics["warm_start"] == 1.0
    # the gate (no minimum here) took the previous weights as they are: nothing was trained,
    # and the earlier subject keeps its block
    assert job.metrics["trained_facts"] == 0
    assert job.metrics["checked_facts"] == 1  # the new fact; its reused neighbour was checked
    first_table = packs.load(PackRef("demo", 1)).content.table["blocks"]
    grown_table = packs.load(PackRef("demo", 2)).content.table["blocks"]
    # reused from version 1 as they are (no forward pass for the unchanged subject)
    assert torch.equal(grown_table[0], first_table[0])
    first_gate = packs.load(PackRef("demo", 1)).content.table["gate.prompt_embeddings"]
    grown_gate = packs.load(PackRef("demo", 2)).content.table["gate.prompt_embeddings"]
    assert torch.equal(grown_gate[0], first_gate[0])
    shrunk = store.delete_fact("demo", first.fact_ids[0])
    assert worker.run_once()
    assert store.job(shrunk).metrics["warm_start"] == 0.0
    assert [f["subject"] for f in packs.load(PackRef("demo", 3)).content.facts] == ["france"]


def test_a_disk_full_while_publishing_keeps_the_old_version(
    backbone: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from server.packs import format as pack_format

    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    packs = PackStore(tmp_path / "packs")
    worker = make_worker(store, packs, backbone, min_reliability=0.0)
    store.submit("demo", FACTS[:1])
    assert worker.run_once()
    assert packs.versions("demo") == [1]
    written = pack_format._write_synced
    calls = 0

    def disk_fills_up(path: Path, data: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the second file of the new version does not fit
            raise OSError(errno.ENOSPC, "No space left on device")
        written(path, data)

    monkeypatch.setattr(pack_format, "_write_synced", disk_fills_up)
    job_id = store.submit("demo", FACTS[1:]).job_id
    assert worker.run_once()
    job = store.job(job_id)
    assert job.state == JobState.QUEUED and "No space left" in (job.error or "")
    assert packs.versions("demo") == [1], "the old version stays the latest"
    assert not any(p.name.startswith(".staging") for p in (tmp_path / "packs" / "demo").iterdir())
    assert [v.version for v in store.versions("demo")] == [1]
    assert len(store.live_facts("demo")) == 2, "no fact lost: the next attempt retries them"
    assert worker.run_once()  # the disk has room again
    assert store.job(job_id).state == JobState.SUCCEEDED and packs.versions("demo") == [1, 2]


def test_a_worker_process_exports_its_metrics(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    import httpx
    from conftest import free_port

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    store = JobStore.open(url)
    store.submit("demo", FACTS[:1])
    port = free_port()
    env = worker_env(tiny_model_dirs, url, tmp_path, LKS_PUBLISH_MIN_RELIABILITY="0")
    args = [sys.executable, "-m", "server.cli", "worker", "--metrics-port", str(port)]
    process = subprocess.Popen(args, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert time.monotonic() < deadline and process.poll() is None
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.TransportError:
                text = ""
            if "lks_training_duration_seconds_count 1.0" in text:
                break
            time.sleep(0.3)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert store.jobs()[0].state == JobState.SUCCEEDED


def test_a_grown_set_trains_when_the_previous_weights_miss_the_gate(
    backbone: Backbone, tmp_path: Path
) -> None:
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    packs = PackStore(tmp_path / "packs")
    worker = make_worker(store, packs, backbone, min_reliability=0.0)
    assert worker.run_once() is False  # nothing queued
    store.submit("demo", FACTS[:1])
    assert worker.run_once()
    no_table_passes = replace(worker.config.build, min_reliability=1.01)
    worker.config = replace(worker.config, build=no_table_passes)
    grown = store.submit("demo", FACTS[1:])
    assert worker.run_once()
    job = store.job(grown.job_id)
    assert job.state == "failed" and "quality gate" in (job.error or "")
    assert job.metrics["trained_facts"] == 2  # the fallback trained (all of a set this small)
    assert packs.versions("demo") == [1]


def test_a_job_keeps_its_lease_through_a_step_longer_than_the_lease(
    backbone: Backbone, tmp_path: Path
) -> None:
    """Loading the gate encoder (cold disk, first job) outlasts the lease before training
    reports any progress: the job's lease holds, and no second worker takes the job."""
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    job_id = store.submit("demo", FACTS[:1]).job_id
    taken: list[object] = []

    def slow_encoder() -> SentenceEncoder:
        time.sleep(2.5)  # the slow step itself, 2.5 leases long
        taken.append(store.claim("intruder", lease_seconds=30))
        return SentenceEncoder()

    worker = Worker(
        store,
        PackStore(tmp_path / "packs"),
        backbone,
        WorkerConfig(
            lease_seconds=1.0,
            heartbeat_seconds=0.2,
            build=BuildPolicy(train=TRAIN, min_reliability=0.0),
        ),
        encoder_factory=slow_encoder,
        name="w",
    )
    assert worker.run_once()
    assert taken == [None], "a second worker took a job that was still running"
    job = store.job(job_id)
    assert job.state == JobState.SUCCEEDED and job.attempts == 1, job.error


def test_a_job_that_fails_every_attempt_ends_failed_with_its_last_error(
    backbone: Backbone, tmp_path: Path
) -> None:
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    not_a_directory = tmp_path / "packs"
    not_a_directory.write_text("the pack store cannot be written")  # every publish fails
    worker = make_worker(store, PackStore(not_a_directory), backbone, min_reliability=0.0)
    job_id = store.submit("demo", FACTS[:1]).job_id
    assert worker.run_once()
    first = store.job(job_id)
    assert first.state == JobState.QUEUED and first.attempts == 1, "retried"
    assert (first.error or "").startswith("attempt 1 of 3: NotADirectoryError")
    worker.config = replace(worker.config, max_attempts=2)  # as LKS_JOB_MAX_ATTEMPTS=2
    assert worker.run_once()
    last = store.job(job_id)
    assert last.state == JobState.FAILED and last.attempts == 2 and last.finished_at
    assert (last.error or "").startswith("attempt 2 of 2: NotADirectoryError")
    assert not worker.run_once(), "it ended: nothing runs it again"
    assert len(store.live_facts("demo")) == 1, "its fact stays for the next job"


def test_deleting_the_last_fact_publishes_a_version_with_no_edits(
    backbone: Backbone, tmp_path: Path
) -> None:
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    packs = PackStore(tmp_path / "packs")
    worker = make_worker(store, packs, backbone, min_reliability=0.0)
    only = store.submit("demo", FACTS[:1])
    assert worker.run_once()
    text = FACTS[0].prompt
    offsets = backbone.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]

    def edits_now() -> list[str]:
        live = PackRegistry(packs, backbone).get(PackRef("demo"))  # what a server would load
        return [edit.label for edit in plan_edits([live.edit_set], text, offsets)]

    assert edits_now() == ["demo@1:danielle darrieux"]
    retrain = store.delete_fact("demo", only.fact_ids[0])
    assert worker.run_once()
    job = store.job(retrain)
    assert job.state == JobState.SUCCEEDED and job.published_version == 2, job.error
    assert job.fact_count == 0 and packs.versions("demo") == [1, 2]
    assert edits_now() == [], "the deleted fact's edit is out of service"
    assert store.versions("demo")[-1].fact_ids == [] and store.facts("demo") == ([], 0)
    again = store.submit("demo", FACTS[1:])  # the pack lives on from nothing
    assert worker.run_once()
    grown = store.job(again.job_id)
    assert grown.published_version == 3 and grown.metrics["warm_start"] == 0.0


def test_a_pack_emptied_before_its_first_version_gets_none(
    backbone: Backbone, tmp_path: Path
) -> None:
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    packs = PackStore(tmp_path / "packs")
    submitted = store.submit("demo", FACTS[:1])
    store.delete_fact("demo", submitted.fact_ids[0])
    assert make_worker(store, packs, backbone).run_once()
    job = store.job(submitted.job_id)
    assert job.state == JobState.SUCCEEDED and job.published_version is None, job.error
    assert packs.versions("demo") == []


def test_a_deleted_fact_stays_live_until_a_version_without_it_is_published(
    backbone: Backbone, tmp_path: Path
) -> None:
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    packs = PackStore(tmp_path / "packs")
    lenient = make_worker(store, packs, backbone, min_reliability=0.0)
    submitted = store.submit("demo", FACTS)
    assert lenient.run_once()
    gone, kept = submitted.fact_ids
    retrain = store.delete_fact("demo", gone)
    assert make_worker(store, packs, backbone, min_reliability=1.01).run_once()
    failed = store.job(retrain)
    assert failed.state == JobState.FAILED and "quality gate" in (failed.error or "")
    assert packs.versions("demo") == [1], "version 1, with the deleted fact, is still served"
    listed, total = store.facts("demo")
    assert total == 2
    assert [(f.id, f.live, f.deleting) for f in listed] == [(gone, True, True), (kept, True, False)]
    again = store.delete_fact("demo", gone)  # asking again queues another retrain
    assert again != retrain and store.job(again).state == JobState.QUEUED
    assert lenient.run_once()
    assert store.job(again).state == JobState.SUCCEEDED and packs.versions("demo") == [1, 2]
    listed, total = store.facts("demo")
    assert total == 1 and [(f.id, f.live, f.deleting) for f in listed] == [(kept, True, False)]
    with pytest.raises(NotFoundError):
        store.delete_fact("demo", gone)


def test_a_worker_started_before_its_database_waits_for_it(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """`lks worker` against a PostgreSQL database that does not exist yet keeps polling; once
    the database is there it migrates it and trains what is submitted. `--once` fails at once
    with the reason instead."""
    from jobs_db import later_database

    with later_database(tmp_path) as (url, create):
        env = worker_env(tiny_model_dirs, url, tmp_path, LKS_PUBLISH_MIN_RELIABILITY="0")
        once = subprocess.run(
            [sys.executable, "-m", "server.cli", "worker", "--once"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert once.returncode != 0 and url.rsplit("/", 1)[1] in once.stderr, once.stderr
        log = tmp_path / "worker.log"
        with log.open("w") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "worker"], env=env, stderr=stderr
            )
        try:
            deadline = time.monotonic() + 90
            while "not reachable yet" not in log.read_text():
                assert process.poll() is None, f"the worker exited: {log.read_text()}"
                assert time.monotonic() < deadline, "the worker never said it waits"
                time.sleep(0.1)
            # two polls fail (each says so) and the worker lives on
            while log.read_text().count("; retrying") < 3:  # the start's warning and two polls
                assert process.poll() is None, f"the worker exited: {log.read_text()}"
                assert time.monotonic() < deadline, "the worker stopped polling"
                time.sleep(0.1)
            assert process.poll() is None, f"the worker exited: {log.read_text()}"
            create()
            store = JobStore.open(url)
            job_id = store.submit("demo", FACTS[:1]).job_id
            deadline = time.monotonic() + 90
            while store.job(job_id).state != JobState.SUCCEEDED:
                assert time.monotonic() < deadline, f"never trained: {store.job(job_id)}"
                assert process.poll() is None, "the worker exited"
                time.sleep(0.2)
            store.close()
        finally:
            process.terminate()
            process.wait(timeout=30)
