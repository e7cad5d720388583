"""A prompt that does not fit the model's context is refused at admission (422), once
tokenised, and the engine goes on serving."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api import create_app
from server.model import load_backbone
from server.settings import Settings

pytestmark = pytest.mark.http


def test_a_prompt_over_the_context_gets_422(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    backbone = load_backbone(Settings(model=tiny_model_dirs["llama"], device="cpu"))
    assert backbone.context_length == 128
    app = create_app(Settings(packs_dir=tmp_path, worker=False), backbone=backbone)
    with TestClient(app) as client:
        long = {"prompt": "who was born in paris " * 25, "max_tokens": 30}  # 125 + 30 > 128
        refused = client.post("/v1/generate", json=long)
        assert refused.status_code == 422
        error = refused.json()["error"]
        assert error["param"] == "max_tokens" and "context of 128 tokens" in error["message"]
        assert app.state.lks.runtime.scheduler.in_flight == 0, "a refused request holds no slot"
        fits = client.post("/v1/generate", json={"prompt": "who was", "max_tokens": 3})
        assert fits.status_code == 200
