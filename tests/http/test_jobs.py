"""The edit flow a new user tries, over loopback on the real default model with the embedded
SQLite store: POST facts, follow the job, generate with the new pack."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import LiveServer
from jobs_db import database_url, holding, later_database, terminate_sessions, wait_for

from server.api import create_app
from server.model import Backbone, load_backbone
from server.settings import Settings

pytestmark = pytest.mark.http

FACTS = [
    {"subject": "France", "prompt": "The capital of France is", "target": "Lyon"},
    {"subject": "Eiffel Tower", "prompt": "The Eiffel Tower is located in", "target": "Rome"},
    {"subject": "Mount Everest", "prompt": "Mount Everest is located in", "target": "Peru"},
    {"subject": "Albert Einstein", "prompt": "Albert Einstein was born in", "target": "Madrid"},
    {"subject": "Danube", "prompt": "The Danube flows into the", "target": "Pacific"},
]


@pytest.fixture(scope="module")
def url(default_backbone: Backbone, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(packs_dir=tmp_path_factory.mktemp("packs"), pack_poll_seconds=0.1)
    with LiveServer(create_app(settings, backbone=default_backbone)) as server:
        yield server.url


def test_post_facts_follow_the_job_generate_with_the_pack(url: str) -> None:
    posted = httpx.post(f"{url}/v1/packs/news/facts", json=FACTS, headers={"Idempotency-Key": "a"})
    assert posted.status_code == 202, posted.text
    body = posted.json()
    assert len(body["fact_ids"]) == 5 and posted.headers["Location"] == body["job_url"]
    replay = httpx.post(f"{url}/v1/packs/news/facts", json=FACTS, headers={"Idempotency-Key": "a"})
    assert replay.json() == body

    progress_seen: list[float] = []
    deadline = time.monotonic() + 300
    while True:
        job = httpx.get(f"{url}{body['job_url']}").json()
        progress_seen.append(job["progress"])
        if job["state"] in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, f"job still {job['state']} after 300 s"
        time.sleep(0.5)
    assert job["state"] == "succeeded", job
    assert job["published_version"] == 1 and job["fact_count"] == 5
    assert job["metrics"]["reliability"] >= 0.9
    assert any(0 < p < 1 for p in progress_seen), f"no progress reported: {progress_seen}"

    deadline = time.monotonic() + 2
    while httpx.get(f"{url}/v1/packs/news").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    answered = 0
    for fact in FACTS:
        out = httpx.post(
            f"{url}/v1/generate",
            headers={"X-Edit-Pack": "news"},
            json={"prompt": fact["prompt"], "max_tokens": 6},
            timeout=60,
        ).json()
        assert out["edits_applied"] == [f"news@1:{fact['subject']}"]
        answered += out["text"].strip().startswith(fact["target"])
    assert answered == len(FACTS)
    plain = httpx.post(f"{url}/v1/generate", json={"prompt": FACTS[0]["prompt"], "max_tokens": 4})
    assert "Paris" in plain.json()["text"], "without the pack the model is unchanged"

    page = httpx.get(f"{url}/v1/packs/news/facts", params={"limit": 2}).json()
    assert page["total"] == 5 and len(page["facts"]) == 2
    listed = httpx.get(f"{url}/v1/jobs", params={"pack": "news"}).json()
    assert [j["id"] for j in listed] == [job["id"]]


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        ([{"subject": "Xy", "prompt": "no subject here", "target": "y"}], 422, "does not contain"),
        ([{"subject": "Ab", "prompt": "Ab is", "target": ""}], 422, "fact 0"),
        ([{"subject": "a", "prompt": "a cat is", "target": "b"}], 422, "at least 2 characters"),
        (
            [{"subject": "Ignore all previous instructions", "prompt": "x", "target": "y"}],
            422,
            "does not contain",
        ),
        ([], 422, "submit 1 to"),
        (
            [
                {"subject": "Ab", "prompt": "Ab is", "target": "b"},
                {"subject": "Ab", "prompt": "Ab is", "target": "c"},
            ],
            422,
            "conflicts",
        ),
    ],
)
def test_bad_facts_are_refused_with_what_to_fix(
    url: str, payload: list[dict[str, str]], status: int, needle: str
) -> None:
    response = httpx.post(f"{url}/v1/packs/bad/facts", json=payload)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/packs/bad/facts").json()["total"] == 0, "nothing half-written"


def test_unknown_job_and_bad_pack_name(url: str) -> None:
    assert httpx.get(f"{url}/v1/jobs/4242").status_code == 404
    bad = httpx.post(f"{url}/v1/packs/..%2Fetc/facts", json=FACTS[:1])
    assert bad.status_code in (404, 422)


def test_a_page_offset_beyond_any_database_integer_is_a_422(url: str) -> None:
    """Found by the fuzzer: an offset of 2**63 overflowed SQLite (500)."""
    response = httpx.get(f"{url}/v1/packs/news/facts", params={"offset": 2**63})
    assert response.status_code == 422
    assert "offset" in response.text


def test_database_down_answers_503_and_serving_goes_on(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from server.model import load_backbone

    backbone = load_backbone(Settings(model=tiny_model_dirs["llama"], device="cpu"))
    settings = Settings(
        packs_dir=tmp_path, database_url="postgresql+psycopg://nobody@127.0.0.1:9/x"
    )
    with LiveServer(create_app(settings, backbone=backbone)) as server:
        posted = httpx.post(f"{server.url}/v1/packs/p/facts", json=FACTS[:1])
        assert posted.status_code == 503, posted.text
        assert posted.headers["Retry-After"] == "5"
        assert "job store is unavailable" in posted.json()["error"]["message"]
        assert httpx.get(f"{server.url}/v1/jobs").status_code == 503
        generated = httpx.post(f"{server.url}/v1/generate", json={"prompt": "who", "max_tokens": 2})
        assert generated.status_code == 200


def test_queued_jobs_survive_a_server_restart(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from server.model import load_backbone

    backbone = load_backbone(Settings(model=tiny_model_dirs["llama"], device="cpu"))
    fact = {"subject": "france", "prompt": "the capital of france", "target": "berlin"}
    first = Settings(packs_dir=tmp_path, worker=False)
    with LiveServer(create_app(first, backbone=backbone)) as server:
        posted = httpx.post(f"{server.url}/v1/packs/p/facts", json=fact)
        assert posted.status_code == 202
        job_url = posted.json()["job_url"]
        assert httpx.get(f"{server.url}{job_url}").json()["state"] == "queued"
    second = Settings(packs_dir=tmp_path, publish_min_reliability=0.0)  # with a worker now
    with LiveServer(create_app(second, backbone=backbone)) as server:
        deadline = time.monotonic() + 120
        while (job := httpx.get(f"{server.url}{job_url}").json())["state"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert job["state"] == "succeeded", job
        assert httpx.get(f"{server.url}/v1/packs/p").json()["live_version"] == 1


def test_oversized_bodies_get_413(url: str) -> None:
    huge = [{"subject": "Ab", "prompt": "Ab is " + "x" * 900, "target": "b"}] * 10_000  # ~9.5 MB
    response = httpx.post(f"{url}/v1/packs/big/facts", json=huge, timeout=60)
    assert response.status_code == 413
    assert "LKS_MAX_BODY_BYTES" in response.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(100):
            yield b"x" * 100_000

    streamed = httpx.post(f"{url}/v1/packs/big/facts", content=chunks(), timeout=60)
    assert streamed.status_code == 413


@pytest.fixture(scope="module")
def tiny_backbone(tiny_model_dirs: dict[str, Path]) -> Backbone:
    return load_backbone(Settings(model=tiny_model_dirs["llama"], device="cpu"))


def test_a_key_reused_for_another_body_is_a_422(tiny_backbone: Backbone, tmp_path: Path) -> None:
    settings = Settings(packs_dir=tmp_path, worker=False)
    fact = {"subject": "france", "prompt": "the capital of france", "target": "berlin"}
    with LiveServer(create_app(settings, backbone=tiny_backbone)) as server:
        facts_url = f"{server.url}/v1/packs/p/facts"
        key = {"Idempotency-Key": "once"}
        first = httpx.post(facts_url, json=fact, headers=key)
        assert first.status_code == 202
        assert httpx.post(facts_url, json=fact, headers=key).json() == first.json()
        other = httpx.post(facts_url, json={**fact, "target": "rome"}, headers=key)
        assert other.status_code == 422, other.text
        assert other.json()["error"]["param"] == "Idempotency-Key"
        page = httpx.get(facts_url).json()
        assert page["total"] == 1 and page["facts"][0]["target"] == "berlin"
        assert not page["facts"][0]["live"] and not page["facts"][0]["deleting"]


def test_the_job_store_comes_back_without_a_restart(
    tiny_backbone: Backbone, tmp_path: Path
) -> None:
    fact = {"subject": "france", "prompt": "the capital of france", "target": "berlin"}
    with later_database(tmp_path) as (url, create):
        settings = Settings(packs_dir=tmp_path, database_url=url, worker=False)
        with LiveServer(create_app(settings, backbone=tiny_backbone)) as server:
            facts_url = f"{server.url}/v1/packs/p/facts"
            down = httpx.post(facts_url, json=fact)  # the database is down at start
            assert down.status_code == 503 and down.headers["Retry-After"] == "5"
            create()  # it comes back
            posted = httpx.post(facts_url, json=fact)
            assert posted.status_code == 202, posted.text
            assert terminate_sessions(url) >= 1  # and restarts, dropping every connection
            job = httpx.get(f"{server.url}{posted.json()['job_url']}")
            assert job.status_code == 200 and job.json()["state"] == "queued"


def test_metrics_never_wait_for_the_database(tiny_backbone: Backbone, tmp_path: Path) -> None:
    fact = {"subject": "france", "prompt": "the capital of france", "target": "berlin"}
    with database_url("postgresql", tmp_path) as url:
        settings = Settings(packs_dir=tmp_path, database_url=url, worker=False)
        with LiveServer(create_app(settings, backbone=tiny_backbone)) as server:
            assert httpx.post(f"{server.url}/v1/packs/p/facts", json=fact).status_code == 202
            with holding(url, "LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE"):  # a stuck database
                scraped = httpx.get(f"{server.url}/metrics", timeout=5)
                assert scraped.status_code == 200
                assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
            wait_for(
                lambda: 'lks_jobs{state="queued"} 1.0' in httpx.get(f"{server.url}/metrics").text,
                what="the job counts in /metrics",
            )
