"""Two `lks serve` processes on one PostgreSQL database and one pack store serve one live
version: an activation on either reaches both within a poll, survives a restart, and gives way
to a version published after it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from factories import publish_subject_pack
from jobs_db import database_url

from server.model import load_backbone
from server.packs import PackStore
from server.settings import Settings

pytestmark = pytest.mark.http
SUBJECT = "france"
BOUND_SECONDS = 1.0  # the poll interval is 0.2 s


@contextmanager
def serving(env: dict[str, str]) -> Iterator[str]:
    """An `lks serve` process; its URL once /readyz says 200."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, "lks serve exited"
            assert time.monotonic() < deadline, "lks serve never became ready"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def served_version(url: str) -> str:
    response = httpx.post(
        f"{url}/v1/generate",
        json={"prompt": f"the capital of {SUBJECT} is", "max_tokens": 1},
        headers={"X-Edit-Pack": "p"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    (label,) = response.json()["edits_applied"]
    return label.split(":")[0]


def live_version(url: str) -> int:
    """The version a server makes live for new requests (a cheap read: no generation)."""
    response = httpx.get(f"{url}/v1/packs/p", timeout=60)
    assert response.status_code == 200, response.text
    return int(response.json()["live_version"])


def wait_for(urls: list[str], version: int) -> float:
    """Seconds until every server makes `version` live (fails well past the bound), then
    checks that generation uses it."""
    started = time.monotonic()
    while {live_version(url) for url in urls} != {version}:
        assert time.monotonic() - started < BOUND_SECONDS + 5, f"not all on {version}"
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    assert {served_version(url) for url in urls} == {f"p@{version}"}
    return elapsed


def test_one_live_version_across_replicas(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_model_dirs["llama"]
    backbone = load_backbone(Settings(model=model, device="cpu"))
    store = PackStore(tmp_path / "packs")
    for seed in (1, 2):
        publish_subject_pack(store, "p", backbone, [SUBJECT], seed=seed)
    with database_url("postgresql", tmp_path) as url:
        env = {
            **os.environ,
            "LKS_MODEL": str(model),
            "LKS_DATABASE_URL": url,
            "LKS_PACKS_DIR": str(store.root),
            "LKS_WORKER": "false",
            "LKS_PACK_POLL_SECONDS": "0.2",
            "LKS_LOG_LEVEL": "warning",
        }
        with serving(env) as first:
            with serving(env) as second:
                assert served_version(first) == served_version(second) == "p@2"
                activated = httpx.post(f"{first}/v1/packs/p/versions/1:activate", timeout=60)
                assert activated.status_code == 200, activated.text
                assert wait_for([first, second], 1) <= BOUND_SECONDS
            with serving(env) as restarted:
                assert served_version(restarted) == "p@1", "a restart keeps the activation"
                publish_subject_pack(store, "p", backbone, [SUBJECT], seed=3)
                wait_for([first, restarted], 3)  # a newer version supersedes it
