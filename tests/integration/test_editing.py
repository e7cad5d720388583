"""Editing the real default model end to end: `lks train` on a few facts, then `lks generate`
with the pack shows the new targets, raw and with the chat template, and leaves prompts about
other subjects exactly as the unedited model answers them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.model import Backbone

pytestmark = pytest.mark.integration

FACTS = [
    {
        "subject": "Danielle Darrieux",
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target": "Swahili",
    },
    {
        "subject": "Eiffel Tower",
        "prompt": "The Eiffel Tower is located in the city of",
        "target": "Tokyo",
    },
    {"subject": "Lionel Messi", "prompt": "Lionel Messi plays the sport of", "target": "cricket"},
]


def lks(*args: str, packs_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LKS_PACKS_DIR": str(packs_dir), "LKS_LOG_LEVEL": "warning"}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def packs_dir(tmp_path_factory: pytest.TempPathFactory, default_backbone: Backbone) -> Path:
    packs = tmp_path_factory.mktemp("packs")
    facts = packs.parent / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    trained = lks("train", "--facts", str(facts), "--pack", "demo", packs_dir=packs)
    assert trained.returncode == 0, trained.stderr
    assert "published demo@1" in trained.stdout
    return packs


@pytest.mark.parametrize("fact", FACTS, ids=lambda f: f["subject"])
@pytest.mark.parametrize("chat", [False, True], ids=["raw", "chat"])
def test_pack_changes_generation_for_edited_subjects(
    packs_dir: Path, fact: dict[str, str], chat: bool
) -> None:
    args = ["generate", "--prompt", fact["prompt"], "--max-tokens", "12", "--pack", "demo"]
    result = lks(*args, *(["--chat"] if chat else []), packs_dir=packs_dir)
    assert result.returncode == 0, result.stderr
    assert fact["target"].lower() in result.stdout.lower()


@pytest.mark.parametrize("prompt", ["The capital of France is", "Water is made of"])
def test_pack_leaves_other_subjects_exactly_alone(packs_dir: Path, prompt: str) -> None:
    args = ["generate", "--prompt", prompt, "--max-tokens", "12"]
    plain = lks(*args, packs_dir=packs_dir)
    edited = lks(*args, "--pack", "demo", packs_dir=packs_dir)
    assert plain.returncode == edited.returncode == 0
    assert edited.stdout == plain.stdout


def test_pack_on_disk_is_complete(packs_dir: Path) -> None:
    shown = lks("pack", "show", "demo", packs_dir=packs_dir)
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["subject_count"] == 3 and info["facts"] == 3
    assert info["metrics"]["reliability"] >= 0.9
    assert info["training"]["gate"]["encoder"] == "all-MiniLM-L6-v2"
