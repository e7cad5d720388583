"""The HTTP server, over real loopback sockets."""

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import LiveServer, free_port

from server.api import create_app
from server.engine.engine import BatchEngine
from server.model import Backbone, load_backbone
from server.settings import Settings

pytestmark = pytest.mark.http


@pytest.fixture(scope="module")
def server_url(default_backbone: Backbone, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    settings = Settings(packs_dir=tmp_path_factory.mktemp("packs"), max_tokens_limit=64)
    with LiveServer(create_app(settings, backbone=default_backbone)) as server:
        yield server.url


def test_health_and_readiness(server_url: str) -> None:
    assert httpx.get(f"{server_url}/healthz").json()["status"] == "ok"
    ready = httpx.get(f"{server_url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["model"] == "SmolLM2-135M-Instruct"


def test_generate_paris(server_url: str) -> None:
    response = httpx.post(
        f"{server_url}/v1/generate",
        json={"prompt": "The capital of France is", "max_tokens": 5},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "Paris" in body["text"]
    assert 1 <= body["tokens"] <= 5
    assert body["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"max_tokens": 5}, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 65}, "max_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "unknown": 1}, "unknown"),
    ],
)
def test_bad_requests_get_the_error_envelope(server_url: str, payload: dict, param: str) -> None:  # type: ignore[type-arg]
    response = httpx.post(f"{server_url}/v1/generate", json=payload)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param in error["message"]


def test_unknown_route_uses_the_envelope(server_url: str) -> None:
    response = httpx.get(f"{server_url}/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_lks_serve_is_ready_only_after_loading(tiny_model_dirs: dict[str, Path]) -> None:
    """`lks serve` as a process: it answers /healthz at once, /readyz once the model is in."""
    port = free_port()
    env = {**os.environ, "LKS_MODEL": str(tiny_model_dirs["llama"]), "LKS_LOG_LEVEL": "warning"}
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        seen: list[int] = []
        while time.monotonic() < deadline:
            try:
                seen.append(httpx.get(f"{url}/readyz", timeout=2).status_code)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            if seen[-1] == 200:
                break
            time.sleep(0.05)
        assert seen and seen[-1] == 200, f"never ready: {seen}"
        assert set(seen) <= {200, 503}
        generated = httpx.post(f"{url}/v1/generate", json={"prompt": "who was", "max_tokens": 3})
        assert generated.status_code == 200
        assert generated.json()["model"] == "llama"
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_readiness_waits_for_the_compiled_decode_step(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With LKS_COMPILE_DECODE the server says "warming" (503) until the step is compiled,
    then ready; a request sent meanwhile waits and is served. (The warm-up is held until the
    request is in: graphs an earlier test compiled can make it too quick to observe.)"""
    release = threading.Event()
    warm_up = BatchEngine.warm_up

    def held_warm_up(engine: BatchEngine) -> float:
        release.wait(60)
        return warm_up(engine)

    monkeypatch.setattr(BatchEngine, "warm_up", held_warm_up)
    settings = Settings(
        model=tiny_model_dirs["llama"], packs_dir=tmp_path, device="cpu", compile_decode=True
    )
    with LiveServer(create_app(settings, backbone=load_backbone(settings))) as server:
        ready = httpx.get(f"{server.url}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "warming"
        with ThreadPoolExecutor(1) as pool:
            early = pool.submit(
                httpx.post,
                f"{server.url}/v1/generate",
                json={"prompt": "who was", "max_tokens": 3},
                timeout=300,
            )
            time.sleep(0.5)
            assert not early.done(), "served before the warm-up"
            assert httpx.get(f"{server.url}/readyz").json()["status"] == "warming"
            release.set()
            response = early.result(timeout=300)
        assert response.status_code == 200 and response.json()["tokens"] >= 1
        ready = httpx.get(f"{server.url}/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ok"
