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

from server.api import create_app
from server.model import load_backbone
from server.packs import PackStore
from server.settings import Settings

pytestmark = pytest.mark.http


@pytest.fixture(scope="module")
def app(
    tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FastAPI]:
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
