"""Authentication with roles, per-key pack allow-lists and rate limits, over loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import LiveServer
from factories import publish_subject_pack

from server.api import auth, create_app
from server.model import load_backbone
from server.packs import PackStore
from server.settings import Settings

pytestmark = pytest.mark.http


def add_key(
    keys_file: Path, name: str, role: str, packs: str | None = None, rpm: int | None = None
) -> str:
    args = [sys.executable, "-m", "server.cli", "keys", "add", "--name", name, "--role", role]
    args += ["--packs", packs] if packs else []
    args += ["--rpm", str(rpm)] if rpm else []
    env = {**os.environ, "LKS_API_KEYS_FILE": str(keys_file)}
    result = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    return result.stdout.strip()


@pytest.fixture(scope="module")
def server(
    tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, str], Path]]:
    root = tmp_path_factory.mktemp("auth")
    keys_file = root / "keys.json"
    keys = {
        "read": add_key(keys_file, "reader", "read", "a"),  # once through `lks keys add`
        "write": auth.add_key(keys_file, "writer", "write", ["a"], None),
        "admin": auth.add_key(keys_file, "ops", "admin", [], None),
        "slow": auth.add_key(keys_file, "slow", "read", [], 2),
    }
    backbone = load_backbone(Settings(model=tiny_model_dirs["llama"], device="cpu"))
    store = PackStore(root / "packs")
    for seed, name in enumerate(["a", "b"]):
        publish_subject_pack(store, name, backbone, ["france"], seed=seed)
    settings = Settings(packs_dir=root / "packs", api_keys_file=keys_file, worker=False)
    with LiveServer(create_app(settings, backbone=backbone)) as live:
        yield live.url, keys, keys_file


def call(url: str, method: str, path: str, key: str | None, **kwargs: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kwargs.pop("headers", {}))  # type: ignore[arg-type]
    return httpx.request(method, f"{url}{path}", headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]


def generate(url: str, key: str | None, pack: str | None = None) -> httpx.Response:
    headers = {"X-Edit-Pack": pack} if pack else {}
    body = {"prompt": "the capital of france", "max_tokens": 2}
    return call(url, "POST", "/v1/generate", key, json=body, headers=headers)


FACT = {"subject": "france", "prompt": "the capital of france", "target": "rome"}


def test_keys_are_stored_hashed(server: tuple[str, dict[str, str], Path]) -> None:
    _, keys, keys_file = server
    text = keys_file.read_text()
    assert all(key not in text for key in keys.values())
    assert {r["role"] for r in json.loads(text)} == {"read", "write", "admin"}


def test_roles_and_pack_allow_lists(server: tuple[str, dict[str, str], Path]) -> None:
    url, keys, _ = server
    assert httpx.get(f"{url}/healthz").status_code == 200, "health needs no key"
    missing = generate(url, None)
    assert missing.status_code == 401 and "Bearer" in missing.json()["error"]["message"]
    assert generate(url, "lks-wrong").status_code == 401
    assert generate(url, keys["read"], "a").status_code == 200
    denied = generate(url, keys["read"], "b")
    assert (
        denied.status_code == 403 and "may not use pack(s) b" in denied.json()["error"]["message"]
    )
    read_submit = call(url, "POST", "/v1/packs/a/facts", keys["read"], json=FACT)
    assert read_submit.status_code == 403, "a read key cannot submit facts"
    written = call(url, "POST", "/v1/packs/a/facts", keys["write"], json=FACT)
    assert written.status_code == 202
    assert call(url, "POST", "/v1/packs/b/facts", keys["write"], json=FACT).status_code == 403
    job_url = written.json()["job_url"]
    assert call(url, "GET", job_url, keys["write"]).status_code == 200
    assert call(url, "GET", "/v1/jobs", keys["write"]).status_code == 403
    assert call(url, "GET", "/v1/jobs", keys["admin"]).status_code == 200
    assert call(url, "POST", "/v1/packs/a/versions/1:activate", keys["write"]).status_code == 403
    assert call(url, "POST", "/v1/packs/a/versions/1:activate", keys["admin"]).status_code == 200
    assert call(url, "POST", f"{job_url}:cancel", keys["admin"]).status_code == 200


def test_rate_limit_answers_429_with_retry_after(server: tuple[str, dict[str, str], Path]) -> None:
    url, keys, _ = server
    assert generate(url, keys["slow"]).status_code == 200
    assert generate(url, keys["slow"]).status_code == 200
    limited = generate(url, keys["slow"])
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1


def test_openai_client_sends_its_key(server: tuple[str, dict[str, str], Path]) -> None:
    url, keys, _ = server
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=keys["read"])
    out = good.completions.create(model="llama:a", prompt="the capital of", max_tokens=2)
    assert out.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.PermissionDeniedError):
        good.completions.create(model="llama:b", prompt="the capital of", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope").models.list()
