"""Hostile and unlucky requests against a real server on the real default model: each one gets
its own 2xx or 4xx (or its own 5xx when its fault is the server's) within a bound, the next
ordinary request is answered, and readiness tells the truth when the engine cannot serve."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import LiveServer
from factories import publish_subject_pack

from server.api import create_app
from server.engine.engine import EngineEvent, EngineRequest
from server.engine.sampling import SamplingParams
from server.gate.encoder import SentenceEncoder
from server.model import Backbone
from server.packs import PackStore
from server.settings import Settings

pytestmark = pytest.mark.http

ORDINARY = {"prompt": "The capital of France is", "max_tokens": 4}
BOUND_SECONDS = 60


SUBJECT = "Palazzo Ferro Fini"


@pytest.fixture(scope="module")
def server(
    default_backbone: Backbone, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """The default settings, and a gated pack `venice` that edits one subject."""
    root = tmp_path_factory.mktemp("packs")
    publish_subject_pack(
        PackStore(root), "venice", default_backbone, [SUBJECT], seed=0,
        gate_encoder=SentenceEncoder(),
    )  # fmt: skip
    settings = Settings(packs_dir=root, worker=False)
    with LiveServer(create_app(settings, backbone=default_backbone)) as live:
        yield live


def post(url: str, body: dict[str, object], path: str = "/v1/generate") -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=BOUND_SECONDS)


def assert_ordinary_request_answers(url: str) -> None:
    response = post(url, ORDINARY)
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["text"]
    assert httpx.get(f"{url}/readyz").status_code == 200


@pytest.mark.parametrize(
    ("name", "body", "path"),
    [
        ("denormal temperature", {"prompt": "hi", "temperature": 1e-39, "max_tokens": 4}, None),
        ("denormal top_p", {"prompt": "hi", "temperature": 0.7, "top_p": 1e-45}, None),
        ("zero-ish temperature, chat", {"model": "x", "temperature": 5e-324, "max_tokens": 4,
         "messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions"),
        ("a 50,000-character stop string", {"prompt": "hi", "stop": "x" * 50_000}, None),
        ("20,000 chat messages",
         {"messages": [{"role": "user", "content": "hi"}] * 20_000, "max_tokens": 4}, None),
    ],
)  # fmt: skip
def test_each_hostile_request_ends_and_the_next_is_served(
    server: LiveServer, name: str, body: dict[str, object], path: str | None
) -> None:
    started = time.monotonic()
    response = post(server.url, body, path or "/v1/generate")
    assert time.monotonic() - started < BOUND_SECONDS, name
    assert 200 <= response.status_code < 500, f"{name}: {response.status_code} {response.text}"
    if response.status_code >= 400:
        assert response.json()["error"]["message"], name
    assert_ordinary_request_answers(server.url)


@pytest.mark.parametrize(
    ("body", "param", "setting"),
    [
        ({"prompt": "x" * 100_001}, "prompt", "LKS_MAX_PROMPT_CHARS"),
        ({"messages": [{"role": "user", "content": "hi"}] * 513}, "messages",
         "LKS_MAX_CHAT_MESSAGES"),
        ({"prompt": "hi", "stop": [str(i) for i in range(9)]}, "stop", "LKS_MAX_STOP_STRINGS"),
        ({"prompt": "hi", "stop": "x" * 257}, "stop", "LKS_MAX_STOP_CHARS"),
        ({"prompt": f"{SUBJECT} is next to. " * 257, "pack": "venice"}, "prompt",
         "LKS_MAX_SUBJECT_MATCHES"),
    ],
)  # fmt: skip
def test_each_bound_answers_422_naming_its_setting(
    server: LiveServer, body: dict[str, object], param: str, setting: str
) -> None:
    headers = {"X-Edit-Pack": str(body.pop("pack"))} if "pack" in body else {}
    response = httpx.post(
        f"{server.url}/v1/generate", json=body, headers=headers, timeout=BOUND_SECONDS
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and setting in error["message"]


def ordinary_latency(url: str, times: int = 7) -> float:
    """The median seconds of an ordinary request without a pack."""
    seconds = []
    for _ in range(times):
        started = time.perf_counter()
        assert post(url, ORDINARY).status_code == 200
        seconds.append(time.perf_counter() - started)
    return sorted(seconds)[times // 2]


def test_a_huge_prompt_repeating_a_gated_subject_does_not_slow_others(
    server: LiveServer,
) -> None:
    """100,000 characters naming the pack's subject over and over: it is refused for its
    length after tokenising (off the engine thread), so it costs the engine nothing."""
    post(server.url, ORDINARY)  # warm
    before = ordinary_latency(server.url)
    hostile = (f"Is {SUBJECT} worth a visit? " * 4000)[:100_000]
    stop = threading.Event()
    answers: list[int] = []

    def flood() -> None:
        deadline = time.monotonic() + BOUND_SECONDS
        while not stop.is_set() and time.monotonic() < deadline:
            response = httpx.post(
                f"{server.url}/v1/generate",
                json={"prompt": hostile, "max_tokens": 4},
                headers={"X-Edit-Pack": "venice"},
                timeout=BOUND_SECONDS,
            )
            answers.append(response.status_code)

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    try:
        time.sleep(0.5)
        loaded = ordinary_latency(server.url)
    finally:
        stop.set()
        sender.join(BOUND_SECONDS)
    # alone before and after: what other work on the machine does to both moments counts once
    usual = max(before, ordinary_latency(server.url))
    print(f"ordinary request: {usual:.3f} s alone, {loaded:.3f} s beside the flood")
    assert answers and set(answers) == {422}, answers
    assert loaded <= 2 * usual, (usual, loaded)


def test_a_request_past_its_deadline_gets_504_and_a_stream_ends_with_an_error_event(
    default_backbone: Backbone, tmp_path: pytest.TempPathFactory
) -> None:
    settings = Settings(packs_dir=tmp_path, worker=False, request_timeout_seconds=0.5)
    long = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
    with LiveServer(create_app(settings, backbone=default_backbone)) as live:
        whole = post(live.url, long)
        assert whole.status_code == 504, whole.text
        assert "LKS_REQUEST_TIMEOUT_SECONDS" in whole.json()["error"]["message"]
        with httpx.stream(
            "POST", f"{live.url}/v1/completions", timeout=BOUND_SECONDS,
            json={**long, "model": "SmolLM2-135M-Instruct", "stream": True},
        ) as stream:  # fmt: skip
            assert stream.status_code == 200
            events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "gateway_timeout" and error["type"] == "server_error"
        assert post(live.url, ORDINARY).status_code == 200


def test_readiness_says_503_when_the_engine_thread_dies(
    default_backbone: Backbone, tmp_path: pytest.TempPathFactory
) -> None:
    """A fault that ends the engine thread itself (injected through a request's event sink)."""
    app = create_app(Settings(packs_dir=tmp_path, worker=False), backbone=default_backbone)
    with LiveServer(app) as live:
        assert httpx.get(f"{live.url}/readyz").status_code == 200

        def fatal(_: EngineEvent) -> None:
            raise SystemExit("injected: the engine thread ends")

        scheduler = app.state.lks.runtime.scheduler
        scheduler._incoming.append(EngineRequest("hi", SamplingParams(), sink=fatal))
        with scheduler._cond:
            scheduler._cond.notify()
        deadline = time.monotonic() + 10
        while scheduler.health().alive and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = httpx.get(f"{live.url}/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "failed"
        assert "engine thread has stopped" in ready.json()["detail"]
        assert post(live.url, ORDINARY).status_code == 503


def test_readiness_says_503_while_work_waits_on_a_stalled_engine(
    default_backbone: Backbone, tmp_path: pytest.TempPathFactory
) -> None:
    settings = Settings(packs_dir=tmp_path, worker=False, ready_stall_seconds=0.3)
    app = create_app(settings, backbone=default_backbone)
    release = threading.Event()
    with LiveServer(app) as live:

        def stuck(_: EngineEvent) -> None:
            release.wait(20)  # holds the engine thread inside a step

        scheduler = app.state.lks.runtime.scheduler
        hung = threading.Thread(
            target=lambda: post(live.url, ORDINARY), daemon=True
        )  # work that waits
        scheduler.engine.add(EngineRequest("hi", SamplingParams(max_tokens=2), sink=stuck))
        hung.start()
        time.sleep(1.0)
        stalled = httpx.get(f"{live.url}/readyz")
        release.set()
        assert stalled.status_code == 503, stalled.text
        assert stalled.json()["status"] == "stalled"
        assert "LKS_READY_STALL_SECONDS" in stalled.json()["detail"]
        hung.join(BOUND_SECONDS)
        assert httpx.get(f"{live.url}/readyz").status_code == 200
