"""Over real loopback HTTP on a tiny model: activating a version that fails validation answers a
clear error naming it, and the version live before keeps serving."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from conftest import LiveServer
from factories import publish_subject_pack
from pack_damage import rewrite_tensors

from server.api import create_app
from server.model import load_backbone
from server.packs import PackRef, PackStore
from server.settings import Settings

pytestmark = pytest.mark.http


def _nan_in_first_block(tensors: dict[str, torch.Tensor]) -> None:
    tensors["blocks"][0, 0] = torch.nan


def test_activating_a_nan_version_is_refused_and_the_live_one_serves_on(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Today's main answers 200 and makes the NaN version live."""
    backbone = load_backbone(Settings(model=tiny_model_dirs["llama"], device="cpu"))
    store = PackStore(tmp_path / "packs")
    publish_subject_pack(store, "a", backbone, ["france"], seed=1)
    settings = Settings(packs_dir=tmp_path / "packs", worker=False, pack_poll_seconds=60)
    body = {"prompt": "the capital of france", "max_tokens": 2}
    with LiveServer(create_app(settings, backbone=backbone)) as server:
        first = httpx.post(f"{server.url}/v1/generate", json=body, headers={"X-Edit-Pack": "a"})
        assert first.status_code == 200 and first.json()["edits_applied"] == ["a@1:france"]

        publish_subject_pack(store, "a", backbone, ["france"], seed=2)  # no poll before 60 s
        rewrite_tensors(store.path(PackRef("a", 2)), "table.safetensors", _nan_in_first_block)
        refused = httpx.post(f"{server.url}/v1/packs/a/versions/2:activate", timeout=30)
        assert refused.status_code == 500
        message = refused.json()["error"]["message"]
        assert "pack a@2: table.safetensors: tensor 'blocks'" in message and "NaN" in message

        assert httpx.get(f"{server.url}/v1/packs/a").json()["live_version"] == 1
        after = httpx.post(f"{server.url}/v1/generate", json=body, headers={"X-Edit-Pack": "a"})
        assert after.status_code == 200 and after.json()["edits_applied"] == ["a@1:france"]
