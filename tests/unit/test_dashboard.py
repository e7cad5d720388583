"""The shipped dashboard queries only metrics the server exports, and the compose file holds the
services operators expect."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api import create_app
from server.model import load_backbone
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def dashboard_metrics() -> set[str]:
    dashboard = json.loads((ROOT / "docker/grafana/dashboards/lks.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 15
    return {m for e in exprs for m in re.findall(r"\blks_[a-z_]+", e)}


def exported_families(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            names.add(name)
            if kind == "counter":
                names.add(f"{name}_total")
            if kind == "histogram":
                names.update(f"{name}{s}" for s in SUFFIXES[:3])
    return names


def test_every_dashboard_metric_is_exported(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    backbone = load_backbone(Settings(model=tiny_model_dirs["llama"], device="cpu"))
    app = create_app(Settings(packs_dir=tmp_path, worker=False), backbone=backbone)
    with TestClient(app) as client:
        assert (
            client.post("/v1/generate", json={"prompt": "who", "max_tokens": 2}).status_code == 200
        )
        exported = exported_families(client.get("/metrics").text)
    missing = dashboard_metrics() - exported
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"


def test_compose_has_the_services_and_validates() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for service in ("server:", "worker:", "postgres:", "prometheus:", "grafana:"):
        assert f"\n  {service}" in text, service
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose) to validate")
    result = subprocess.run(
        [compose, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
