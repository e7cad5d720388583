"""Two `lks worker` processes on one PostgreSQL database under 100 submissions in 10 s: every
fact lands in its pack's latest published version exactly once, and no pack ever has two jobs
running at once."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import LiveServer
from jobs_db import database_url

from server.api import create_app
from server.jobs.models import JobState
from server.jobs.store import JobStore
from server.model import load_backbone
from server.settings import Settings

pytestmark = pytest.mark.http
PACKS = ["alpha", "beta", "gamma", "delta"]


def test_two_workers_one_database_under_a_burst(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    with database_url("postgresql", tmp_path) as url:
        store = JobStore.open(url)
        packs_dir = tmp_path / "packs"
        env = {
            **os.environ,
            "LKS_MODEL": str(tiny_model_dirs["llama"]),
            "LKS_DATABASE_URL": url,
            "LKS_PACKS_DIR": str(packs_dir),
            "LKS_PUBLISH_MIN_RELIABILITY": "0",
            "LKS_LOG_LEVEL": "warning",
        }
        workers = [
            subprocess.Popen([sys.executable, "-m", "server.cli", "worker"], env=env)
            for _ in range(2)
        ]
        backbone = load_backbone(Settings(model=tiny_model_dirs["llama"], device="cpu"))
        settings = Settings(packs_dir=packs_dir, database_url=url, worker=False)
        try:
            with LiveServer(create_app(settings, backbone=backbone)) as server:
                submitted = asyncio.run(_burst(server.url))
                assert len(submitted) == 100
                deadline = time.monotonic() + 240
                while any(j.state in (JobState.QUEUED, JobState.RUNNING) for j in store.jobs()):
                    assert time.monotonic() < deadline, "jobs still pending after 240 s"
                    assert all(w.poll() is None for w in workers), "a worker died"
                    time.sleep(0.5)
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.wait(timeout=30)
        jobs = store.jobs(limit=1000)
        assert all(j.state == JobState.SUCCEEDED for j in jobs), [(j.id, j.error) for j in jobs]
        for pack in PACKS:
            versions = store.versions(pack)
            live = sorted(f.id for f in store.live_facts(pack))
            latest = versions[-1].fact_ids
            assert sorted(latest) == live and len(set(latest)) == len(latest)
            mine = sorted((j for j in jobs if j.pack == pack), key=lambda j: j.started_at)  # type: ignore[arg-type, return-value]
            for earlier, later in itertools.pairwise(mine):
                assert earlier.finished_at <= later.started_at, f"{pack}: two jobs at once"  # type: ignore[operator]
        ids = [i for fact_ids in submitted for i in fact_ids]
        assert len(ids) == len(set(ids)) == 100
        store.close()


async def _burst(url: str) -> list[list[int]]:
    """100 POSTs of one fact each, spread over 10 s, round-robin over the packs."""

    async def post(client: httpx.AsyncClient, i: int) -> list[int]:
        await asyncio.sleep(i * 0.1)
        fact = {"subject": f"city{i}", "prompt": f"the capital of city{i} is", "target": "paris"}
        response = await client.post(f"/v1/packs/{PACKS[i % len(PACKS)]}/facts", json=fact)
        assert response.status_code == 202, response.text
        return list(response.json()["fact_ids"])

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(post(client, i) for i in range(100)))
