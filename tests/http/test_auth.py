"""Authentication with roles, per-key pack allow-lists and rate limits, over loopback."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import LiveServer
from factories import publish_subject_pack

from server.api import auth, create_app
from server.jobs.models import JobState
from server.jobs.store import JobStore
from server.model import Backbone, load_backbone
from server.packs import PackStore
from server.settings import Settings

pytestmark = pytest.mark.http


def lks_keys(keys_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`lks keys ...` as an operator runs it."""
    env = {**os.environ, "LKS_API_KEYS_FILE": str(keys_file)}
    command = [sys.executable, "-m", "server.cli", "keys", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def add_key(
    keys_file: Path, name: str, role: str, packs: str | None = None, rpm: int | None = None
) -> str:
    args = ["add", "--name", name, "--role", role]
    args += ["--packs", packs] if packs else []
    args += ["--rpm", str(rpm)] if rpm else []
    result = lks_keys(keys_file, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def backbone(tiny_model_dirs: dict[str, Path]) -> Backbone:
    return load_backbone(Settings(model=tiny_model_dirs["llama"], device="cpu"))


Server = tuple[str, dict[str, str], Path]


@pytest.fixture(scope="module")
def server(backbone: Backbone, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("auth")
    keys_file = root / "keys.json"
    keys = {
        "read": add_key(keys_file, "reader", "read", "a"),  # once through `lks keys add`
        "write": auth.add_key(keys_file, "writer", "write", ["a"], None),
        "admin": auth.add_key(keys_file, "ops", "admin", [], None),
        "slow": auth.add_key(keys_file, "slow", "read", [], 2),
        "admin_a": auth.add_key(keys_file, "ops-a", "admin", ["a"], None),
    }
    store = PackStore(root / "packs")
    for seed, name in enumerate(["a", "b", "broken"]):
        publish_subject_pack(store, name, backbone, ["france"], seed=seed)
    table = store.root / "broken" / "1" / "table.safetensors"
    table.write_bytes(table.read_bytes()[:-10])  # on disk, never loaded until asked for
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


# -- auth fails closed ---------------------------------------------------------------------------


def _unusable_keys_file(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / "keys.json"
    if kind == "unreadable":
        path.mkdir()  # reading a directory fails, even as root (chmod would not stop root)
    elif kind == "malformed":
        path.write_text('[{"name": "ops", "role": "admin"')
    elif kind == "not a key":
        path.write_text('[{"name": "ops", "role": "owner", "sha256": "00"}]')
    elif kind == "empty":
        path.write_text("[]\n")
    return path


@pytest.mark.parametrize("kind", ["missing", "unreadable", "malformed", "not a key", "empty"])
def test_an_unusable_keys_file_stops_the_server_from_starting(kind: str, tmp_path: Path) -> None:
    """Never auth silently off: whoever set LKS_API_KEYS_FILE meant auth on."""
    keys_file = _unusable_keys_file(kind, tmp_path)
    settings = Settings(packs_dir=tmp_path / "packs", api_keys_file=keys_file, worker=False)
    with pytest.raises(Exception, match=re.escape(str(keys_file))) as refused:
        create_app(settings)
    assert type(refused.value).__name__ == "KeysFileError"


@pytest.mark.parametrize(
    ("host", "keys", "warned"),
    [("0.0.0.0", False, True), ("::", False, True), ("127.0.0.1", False, False),
     ("localhost", False, False), ("0.0.0.0", True, False)],
)  # fmt: skip
def test_auth_off_on_a_non_loopback_host_is_warned_at_start(
    host: str, keys: bool, warned: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys_file = tmp_path / "keys.json"
    if keys:
        auth.add_key(keys_file, "ops", "admin", [], None)
    settings = Settings(
        host=host, packs_dir=tmp_path, api_keys_file=keys_file if keys else None, worker=False
    )
    with caplog.at_level(logging.WARNING):
        create_app(settings)
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "authentication is OFF" in r.getMessage()
    ]
    assert bool(warnings) == warned, warnings
    assert all(host in w and "LKS_API_KEYS_FILE" in w for w in warnings)


@pytest.fixture
def own_server(backbone: Backbone, tmp_path: Path) -> Iterator[Server]:
    """A server of its own, for tests that change its keys file."""
    keys_file = tmp_path / "keys.json"
    keys = {"admin": auth.add_key(keys_file, "ops", "admin", [], None)}
    settings = Settings(packs_dir=tmp_path / "packs", api_keys_file=keys_file, worker=False)
    with LiveServer(create_app(settings, backbone=backbone)) as live:
        yield live.url, keys, keys_file


def test_keys_added_and_revoked_take_effect_without_a_restart(own_server: Server) -> None:
    url, keys, keys_file = own_server
    temp = add_key(keys_file, "temp", "read")
    assert generate(url, temp).status_code == 200, "a new key works at once"
    listed = lks_keys(keys_file, "list")
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^temp +read +packs \*", listed.stdout, re.M), listed.stdout
    revoked = lks_keys(keys_file, "revoke", "temp")
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked key 'temp'" in revoked.stdout
    refused = generate(url, temp)
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"]["message"] == "unknown API key"
    assert generate(url, keys["admin"]).status_code == 200, "the other keys still work"
    assert "temp" not in lks_keys(keys_file, "list").stdout


@pytest.mark.parametrize("kind", ["missing", "malformed", "not a key", "empty"])
def test_a_keys_file_broken_while_serving_refuses_every_request(
    kind: str, own_server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Fail closed (503, logged), not "keep the last good keys": see Authenticator."""
    url, keys, keys_file = own_server
    good = keys_file.read_text()
    assert generate(url, keys["admin"]).status_code == 200
    keys_file.unlink()
    if kind != "missing":
        _unusable_keys_file(kind, tmp_path)  # the same path
    with caplog.at_level(logging.ERROR, logger="server.api.auth"):
        refused = [generate(url, keys["admin"]), generate(url, None)]
    assert [r.status_code for r in refused] == [503, 503], [r.text for r in refused]
    assert str(tmp_path) not in refused[0].text, "the body names no server path"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(keys_file) in errors[0], errors
    keys_file.write_text(good)
    assert generate(url, keys["admin"]).status_code == 200, "fixing the file is enough"


# -- per-key pack allow-lists wherever a pack is visible or managed ------------------------------


def test_listings_show_only_the_packs_a_key_allows(server: Server) -> None:
    url, keys, _ = server
    for pack in ("a", "b"):  # both live and loaded
        assert generate(url, keys["admin"], pack).status_code == 200
    packs = {p["name"] for p in call(url, "GET", "/v1/packs", keys["read"]).json()}
    assert packs == {"a"}
    assert {"a", "b"} <= {p["name"] for p in call(url, "GET", "/v1/packs", keys["admin"]).json()}
    models = [m["id"] for m in call(url, "GET", "/v1/models", keys["read"]).json()["data"]]
    assert "llama:a" in models and not [m for m in models if m.startswith("llama:b")], models
    everything = [m["id"] for m in call(url, "GET", "/v1/models", keys["admin"]).json()["data"]]
    assert "llama:b" in everything


def test_an_admin_key_manages_only_the_packs_it_allows(server: Server) -> None:
    url, keys, _ = server
    activate_b = call(url, "POST", "/v1/packs/b/versions/1:activate", keys["admin_a"])
    assert activate_b.status_code == 403, activate_b.text
    assert call(url, "DELETE", "/v1/packs/b", keys["admin_a"]).status_code == 403
    assert call(url, "POST", "/v1/packs/a/versions/1:activate", keys["admin_a"]).status_code == 200
    assert call(url, "DELETE", "/v1/packs/a", keys["admin_a"]).status_code == 200


def test_a_key_sees_only_the_jobs_of_packs_it_allows(server: Server) -> None:
    url, keys, _ = server
    fact = {"subject": "germany", "prompt": "the capital of germany", "target": "paris"}
    job_ids = {}
    for pack in ("a", "b"):
        submitted = call(url, "POST", f"/v1/packs/{pack}/facts", keys["admin"], json=fact)
        assert submitted.status_code == 202, submitted.text
        job_ids[pack] = submitted.json()["job_id"]
    seen = {j["pack"] for j in call(url, "GET", "/v1/jobs", keys["admin_a"]).json()}
    assert seen == {"a"}
    assert {"a", "b"} <= {j["pack"] for j in call(url, "GET", "/v1/jobs", keys["admin"]).json()}
    other = f"/v1/jobs/{job_ids['b']}"
    for key in ("write", "admin_a"):
        hidden = call(url, "GET", other, keys[key])
        assert hidden.status_code == 404, hidden.text
        assert hidden.json()["error"]["message"] == f"no job {job_ids['b']}"
        assert call(url, "POST", f"{other}:cancel", keys[key]).status_code == 404
    assert call(url, "GET", other, keys["admin"]).json()["state"] == "queued", "not cancelled"


# -- auth first; error bodies name no server path and no database error --------------------------


def test_job_routes_check_the_key_before_the_database(server: Server) -> None:
    """Otherwise 404 vs 403 tells anyone which job ids exist."""
    url, keys, _ = server
    for method, path in (("GET", "/v1/jobs/999999"), ("POST", "/v1/jobs/999999:cancel")):
        assert call(url, method, path, None).status_code == 401
        assert call(url, method, path, "lks-wrong").status_code == 401
        assert call(url, method, path, keys["read"]).status_code == 403, "a read key has no jobs"


def test_pack_errors_name_no_server_path(server: Server) -> None:
    url, keys, _ = server
    missing = call(url, "POST", "/v1/packs/nope/versions/1:activate", keys["admin"])
    assert missing.status_code == 404 and "no pack named 'nope'" in missing.text
    corrupt = generate(url, keys["admin"], "broken")
    assert corrupt.status_code == 500 and "table.safetensors" in corrupt.text
    for response in (missing, corrupt):
        assert "/tmp" not in response.text and "/pytest-" not in response.text, response.text


def test_a_failed_jobs_error_names_no_server_path(own_server: Server, tmp_path: Path) -> None:
    """The worker stores its exception's text; the API shows it without the server's paths."""
    url, keys, _ = own_server
    submitted = call(url, "POST", "/v1/packs/a/facts", keys["admin"], json=FACT).json()
    store = JobStore.open(Settings(packs_dir=tmp_path / "packs").jobs_database_url)
    try:  # fail the job as a worker whose disk is full would
        job = store.claim("test-worker", 30.0)
        assert job is not None and job.id == submitted["job_id"]
        error = f"OSError: [Errno 28] No space left on device: '{tmp_path / 'packs' / 'a' / '1'}'"
        assert store.finish(job.id, "test-worker", JobState.FAILED, error=error)
    finally:
        store.close()
    shown = call(url, "GET", submitted["job_url"], keys["admin"]).json()
    assert shown["state"] == "failed"
    assert shown["error"] == "OSError: [Errno 28] No space left on device: '…/1'"


@pytest.fixture(scope="module")
def down_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Keys in order, but the model fails to load and the database cannot be opened."""
    root = tmp_path_factory.mktemp("down")
    model = root / "broken-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    keys_file = root / "keys.json"
    keys = {"admin": auth.add_key(keys_file, "ops", "admin", [], None)}
    settings = Settings(
        model=model,
        device="cpu",
        packs_dir=root / "packs",
        database_url=f"sqlite:///{root / 'no-such-dir' / 'jobs.db'}",
        api_keys_file=keys_file,
        worker=False,
    )
    with LiveServer(create_app(settings)) as live:
        deadline = time.monotonic() + 60
        while httpx.get(f"{live.url}/healthz").json()["status"] == "loading":
            assert time.monotonic() < deadline, "the broken model never failed"
            time.sleep(0.1)
        yield live.url, keys, keys_file


CHAT = {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}
DOWN_ROUTES = [
    ("POST", "/v1/generate", {"prompt": "hi"}),
    ("POST", "/v1/completions", {"model": "llama", "prompt": "hi"}),
    ("POST", "/v1/chat/completions", CHAT),
    ("GET", "/v1/models", None),
    ("GET", "/v1/packs", None),
    ("POST", "/v1/packs/a/versions/1:activate", None),
    ("GET", "/v1/jobs", None),
    ("GET", "/v1/jobs/1", None),
    ("POST", "/v1/packs/a/facts", FACT),
    ("GET", "/v1/packs/a/facts", None),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "body"), DOWN_ROUTES)
def test_the_key_is_checked_before_the_model_or_the_job_store(
    down_server: Server, method: str, path: str, body: object
) -> None:
    """A caller without a key learns nothing, not even that the model or database is down;
    one with a key learns that, but not the server's paths or the database's error."""
    url, keys, keys_file = down_server
    kwargs = {"json": body} if body is not None else {}
    assert call(url, method, path, None, **kwargs).status_code == 401
    assert call(url, method, path, "lks-wrong", **kwargs).status_code == 401
    down = call(url, method, path, keys["admin"], **kwargs)
    assert down.status_code == 503, down.text
    assert str(keys_file.parent) not in down.text, down.text
    assert "database" not in down.text and "unable to open" not in down.text, down.text
