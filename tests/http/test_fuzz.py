"""Property-based API test: schemathesis sends what the OpenAPI schema allows (and what it
does not); no input may produce a 5xx. Bounded so that it runs in `make test`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from factories import publish_subject_pack
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.api import create_app
from server.model import load_backbone
from server.packs import PackStore
from server.settings import Settings

pytestmark = pytest.mark.http


@pytest.fixture
def app(
    tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FastAPI]:
    """A fresh app per test: schemathesis' calls may end the lifespan of the one they probe."""
    root = tmp_path_factory.mktemp("fuzz")
    backbone = load_backbone(Settings(model=tiny_model_dirs["llama"], device="cpu"))
    publish_subject_pack(PackStore(root), "demo", backbone, ["france"], seed=0)
    application = create_app(
        Settings(packs_dir=root, worker=False, max_tokens_limit=8), backbone=backbone
    )
    with TestClient(application):  # runs the lifespan: model attached, engine thread started
        yield application


def test_no_input_gives_a_server_error(app: FastAPI) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, "every route is in the schema"
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def probe(case: schemathesis.Case) -> None:
            response = case.call()
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} {case.body!r}: "
                    f"{response.status_code} {response.text[:200]}"
                )

        probe()
    assert not failures, "\n".join(failures[:10])
    assert_still_serving(app)


def assert_still_serving(app: FastAPI) -> None:
    """After whatever came before, an ordinary request answers and readiness says so."""
    client = TestClient(app)  # no `with`: the fixture's lifespan is already running
    ordinary = client.post("/v1/generate", json={"prompt": "who was", "max_tokens": 3})
    assert ordinary.status_code == 200, ordinary.text
    assert client.get("/readyz").status_code == 200


@given(
    temperature=st.floats(0, 2, allow_subnormal=True) | st.sampled_from([5e-324, 1e-39, 1e-5]),
    top_p=st.floats(0, 1, exclude_min=True, allow_subnormal=True) | st.just(1e-45),
    max_tokens=st.integers(-1, 2**64) | st.integers(1, 8),
    seed=st.none() | st.integers(-1, 2**64),
    stop=st.none() | st.lists(st.text(max_size=300), max_size=12),
    path=st.sampled_from(["/v1/generate", "/v1/completions"]),
)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_extreme_sampling_values_never_give_a_server_error(
    app: FastAPI,
    temperature: float,
    top_p: float,
    max_tokens: int,
    seed: int | None,
    stop: list[str] | None,
    path: str,
) -> None:
    body = {
        "prompt": "the capital of france",
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_tokens,
        "seed": seed,
        "stop": stop,
        "model": "llama:demo",
    }
    if path == "/v1/generate":
        body.pop("model")
    response = TestClient(app).post(path, json=body)
    assert response.status_code < 500, (body, response.text)
    assert_still_serving(app)
