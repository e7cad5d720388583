"""Serving with packs over real loopback HTTP on the real default model: per-request packs in
shared batches, hot swaps under load, streaming, the OpenAI client, pack administration."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import LiveServer
from factories import publish_subject_pack

from server.api import create_app
from server.model import Backbone
from server.packs import PackStore
from server.settings import Settings

pytestmark = pytest.mark.http

BASE = "SmolLM2-135M-Instruct"
PACKS = {"fr": "France", "de": "Germany", "it": "Italy", "fr2": "France"}
PROMPTS = [
    "The capital of France is",
    "The capital of Germany is",
    "The capital of Italy is",
    "Tell me about France and Germany:",
]


class Served:
    def __init__(self, url: str, store: PackStore, app: object) -> None:
        self.url, self.store, self.app = url, store, app

    def generate(self, prompt: str, pack: str | None = None, **extra: object) -> httpx.Response:
        headers = {"X-Edit-Pack": pack} if pack else {}
        body = {"prompt": prompt, "max_tokens": 6, **extra}
        return httpx.post(f"{self.url}/v1/generate", json=body, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def served(
    default_backbone: Backbone, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("packs")
    store = PackStore(root)
    for seed, (name, subject) in enumerate(PACKS.items()):
        publish_subject_pack(store, name, default_backbone, [subject], seed=seed)
    settings = Settings(packs_dir=root, max_tokens_limit=256, pack_poll_seconds=0.1)
    app = create_app(settings, backbone=default_backbone)
    with LiveServer(app) as server:
        yield Served(server.url, store, app)


def test_a_pack_applies_to_its_request_only(served: Served) -> None:
    plain = served.generate(PROMPTS[0])
    edited = served.generate(PROMPTS[0], "fr")
    other = served.generate(PROMPTS[1], "fr")
    assert plain.status_code == edited.status_code == other.status_code == 200
    assert edited.json()["edits_applied"] == ["fr@1:France"]
    assert edited.headers["X-Edits-Applied"] == "fr@1:France"
    assert edited.json()["text"] != plain.json()["text"]
    assert other.json()["edits_applied"] == []
    assert other.json()["text"] == served.generate(PROMPTS[1]).json()["text"]


@pytest.mark.parametrize(
    ("header", "status", "needle"),
    [
        ("nope", 404, "no pack named 'nope'"),
        ("fr@9", 404, "has no version 9"),
        ("../etc", 422, "invalid pack name"),
        ("fr,,de", 422, "empty pack name"),
        ("fr,de,it,fr@1,de@1", 422, "at most 4 packs"),
    ],
)
def test_bad_pack_selection(served: Served, header: str, status: int, needle: str) -> None:
    response = served.generate(PROMPTS[0], header)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]


def test_composed_packs_first_listed_wins(served: Served) -> None:
    """Packs compose; where two edit the same subject, the one listed first applies."""
    both = served.generate(PROMPTS[3], "de,fr").json()
    assert sorted(both["edits_applied"]) == ["de@1:Germany", "fr@1:France"]
    fr, other = served.generate(PROMPTS[0], "fr").json(), served.generate(PROMPTS[0], "fr2").json()
    assert fr["text"] != other["text"], "the two packs edit France differently"
    first = served.generate(PROMPTS[0], "fr,fr2").json()
    assert first["edits_applied"] == ["fr@1:France"] and first["text"] == fr["text"]
    swapped = served.generate(PROMPTS[0], "fr2,fr").json()
    assert swapped["edits_applied"] == ["fr2@1:France"] and swapped["text"] == other["text"]


def test_concurrent_requests_of_different_packs_equal_each_alone(served: Served) -> None:
    """52 requests over 3 packs and none, at once: each gets what it gets alone."""
    choices = [None, "fr", "de", "it"]
    combos = [(p, c) for p in PROMPTS for c in choices]
    alone = {combo: served.generate(*combo).json() for combo in combos}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            calls = [
                client.post(
                    f"{served.url}/v1/generate",
                    json={"prompt": prompt, "max_tokens": 6},
                    headers={"X-Edit-Pack": pack} if pack else {},
                )
                for prompt, pack in combos * 4
            ]
            return await asyncio.gather(*calls)

    responses = asyncio.run(burst())
    assert len(responses) == 64
    for (prompt, pack), response in zip(combos * 4, responses, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        expected = alone[(prompt, pack)]
        assert body["text"] == expected["text"], (prompt, pack)
        assert body["edits_applied"] == expected["edits_applied"]
        assert all(label.startswith(f"{pack}@") for label in body["edits_applied"])


def test_streaming_gives_the_same_text(served: Served) -> None:
    whole = served.generate(PROMPTS[0], "fr", max_tokens=12).json()
    chunks, final = [], None
    with httpx.stream(
        "POST",
        f"{served.url}/v1/generate",
        headers={"X-Edit-Pack": "fr"},
        json={"prompt": PROMPTS[0], "max_tokens": 12, "stream": True},
        timeout=60,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["X-Edits-Applied"] == "fr@1:France"
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            chunks.append(event["text"])
            if "finish_reason" in event:
                final = event
    assert "".join(chunks) == whole["text"]
    assert final is not None and final["edits_applied"] == ["fr@1:France"]


def test_openai_client_completions_chat_and_streaming(served: Served) -> None:
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    models = [m.id for m in client.models.list().data]
    assert BASE in models
    plain = client.completions.create(model=BASE, prompt=PROMPTS[0], max_tokens=6, temperature=0)
    by_model = client.completions.create(
        model=f"{BASE}:fr", prompt=PROMPTS[0], max_tokens=6, temperature=0
    )
    by_header = client.completions.create(
        model=BASE,
        prompt=PROMPTS[0],
        max_tokens=6,
        temperature=0,
        extra_headers={"X-Edit-Pack": "fr@1"},
    )
    assert plain.choices[0].text == served.generate(PROMPTS[0]).json()["text"]
    assert by_model.choices[0].text == by_header.choices[0].text != plain.choices[0].text
    assert by_model.usage is not None and by_model.usage.completion_tokens <= 6
    assert f"{BASE}:fr" in [m.id for m in client.models.list().data]

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(
        model=f"{BASE}:fr",
        messages=messages,
        max_tokens=10,
        temperature=0,  # type: ignore[arg-type]
    )
    stream = client.chat.completions.create(
        model=f"{BASE}:fr",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert chat.choices[0].message.content == streamed
    assert chat.choices[0].finish_reason in ("stop", "length")
    completion_stream = client.completions.create(
        model=f"{BASE}:fr", prompt=PROMPTS[0], max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in completion_stream) == by_model.choices[0].text

    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    with pytest.raises(openai.NotFoundError, match="no pack named"):
        client.completions.create(model=f"{BASE}:missing", prompt="hi", max_tokens=1)
    with pytest.raises(openai.UnprocessableEntityError, match="n=1"):
        client.completions.create(model=BASE, prompt="hi", max_tokens=1, n=2)


def test_pack_admin_and_hot_swap_under_load(served: Served, default_backbone: Backbone) -> None:
    """Publish a new version while requests run: none fails, the new one is live within 1 s,
    rolling back is one call."""
    url = served.url
    summary = httpx.get(f"{url}/v1/packs").json()
    assert {p["name"] for p in summary} == set(PACKS)
    failures: list[str] = []
    seen_versions: set[str] = set()
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            response = served.generate(PROMPTS[2], "it")
            if response.status_code != 200:
                failures.append(response.text)
            else:
                seen_versions.update(response.json()["edits_applied"])

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(1.0)
        publish_subject_pack(served.store, "it", default_backbone, ["Italy"], seed=42)
        published = time.monotonic()
        while httpx.get(f"{url}/v1/packs/it").json()["live_version"] != 2:
            assert time.monotonic() - published < 1.0, "new version not live within 1 s"
            time.sleep(0.02)
        after = served.generate(PROMPTS[2], "it").json()
        assert after["edits_applied"] == ["it@2:Italy"]
        time.sleep(1.0)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert failures == []
    assert seen_versions == {"it@1:Italy", "it@2:Italy"}

    detail = httpx.get(f"{url}/v1/packs/it").json()
    assert [v["version"] for v in detail["versions"]] == [1, 2]
    assert detail["versions"][1]["live"] and detail["versions"][1]["fact_count"] == 1
    rolled = httpx.post(f"{url}/v1/packs/it/versions/1:activate")
    assert rolled.status_code == 200 and rolled.json()["live_version"] == 1
    assert served.generate(PROMPTS[2], "it").json()["edits_applied"] == ["it@1:Italy"]
    assert httpx.post(f"{url}/v1/packs/it/versions/7:activate").status_code == 404
    unloaded = httpx.delete(f"{url}/v1/packs/it")
    assert unloaded.status_code == 200 and unloaded.json()["unloaded_versions"] == [1, 2]
    assert httpx.delete(f"{url}/v1/packs/zzz").status_code == 404


def test_a_client_that_goes_away_cancels_its_generation(served: Served) -> None:
    scheduler = served.app.state.lks.runtime.scheduler  # type: ignore[attr-defined]
    aborted = scheduler.aborted
    body = {"prompt": "Count from 1 to 500: 1, 2, 3,", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/generate", json=body, timeout=60) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: "):
            pass
    deadline = time.monotonic() + 2
    while (scheduler.in_flight or scheduler.aborted == aborted) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert scheduler.aborted == aborted + 1
    assert scheduler.in_flight == 0


def test_a_full_queue_answers_503_with_retry_after(served: Served) -> None:
    scheduler = served.app.state.lks.runtime.scheduler  # type: ignore[attr-defined]
    with scheduler._cond:  # hold the queue at its bound, as a burst of requests would
        held, scheduler._in_flight = scheduler._in_flight, scheduler.max_queued
    try:
        busy = served.generate(PROMPTS[0])
    finally:
        with scheduler._cond:
            scheduler._in_flight = held
    assert busy.status_code == 503
    assert busy.headers["Retry-After"] == "1"
    assert "busy" in busy.json()["error"]["message"]
    assert served.generate(PROMPTS[0]).status_code == 200


def test_metrics_after_traffic(served: Served) -> None:
    assert served.generate(PROMPTS[0], "fr").status_code == 200
    httpx.get(f"{served.url}/v1/no-such-route/with-user-text")
    text = httpx.get(f"{served.url}/metrics").text
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['lks_requests_total{endpoint="/v1/generate",status="200"}'] >= 1
    assert samples['lks_edits_applied_total{pack="fr"}'] >= 1
    assert samples["lks_generated_tokens_total"] >= 1
    assert samples["lks_batch_size_count"] >= 1
    assert samples["lks_time_to_first_token_seconds_count"] >= 1
    assert samples["lks_packs_loaded"] >= 1 and samples["lks_pack_memory_bytes"] > 0
    assert 'lks_queue_depth{where="in_flight"}' in samples
    assert "lks_client_disconnects_total" in samples
    assert samples['lks_requests_total{endpoint="unmatched",status="404"}'] >= 1
    assert "with-user-text" not in text, "no raw request text in label values"


def test_with_release_an_edit_stops_steering_once_its_target_is_said(
    served: Served, default_backbone: Backbone, tmp_path: Path
) -> None:
    """`LKS_RELEASE_ANSWERED_EDITS` (on): in a completion, the edit of a statement fact steers
    up to its target, the rest is the model's own, and the response says which edit was
    released. (The module's packs' target, "x", is never said: they steer throughout.)"""
    steered = served.generate(PROMPTS[0], "fr", max_tokens=16).json()
    word = re.search(r"[A-Za-z]{3,}", steered["text"])
    assert word is not None, steered
    store = PackStore(tmp_path)
    publish_subject_pack(store, "fr", default_backbone, ["France"], seed=0, target=word.group())
    settings = Settings(packs_dir=tmp_path)
    with LiveServer(create_app(settings, backbone=default_backbone)) as server:
        body = {"prompt": PROMPTS[0], "max_tokens": 16}
        released = httpx.post(
            f"{server.url}/v1/generate", json=body, headers={"X-Edit-Pack": "fr"}, timeout=120
        ).json()
        streamed = httpx.post(
            f"{server.url}/v1/generate",
            json={**body, "stream": True},
            headers={"X-Edit-Pack": "fr"},
            timeout=120,
        ).text
    said = steered["text"][: word.end()]
    assert released["text"].startswith(said) and released["text"] != steered["text"]
    assert released["edits_applied"] == released["edits_released"] == ["fr@1:France"]
    assert steered["edits_released"] == []
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line[6:7] == "{"]
    assert events[-1]["edits_released"] == ["fr@1:France"]
    assert "".join(e["text"] for e in events) == released["text"]
