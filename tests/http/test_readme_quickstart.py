"""The README's quickstart, run as a new user would: its shell blocks, against a real `lks serve`.

The commands come from README.md itself (every ```sh block of the "Quickstart" section), so the
test breaks when the README changes without its commands working. Two substitutions only: the
server gets a free loopback port instead of 8000, and `make serve` (install, then `lks serve`) is
`lks serve` itself, so the test never reinstalls the environment. A comment line right under a
command is its output as the README shows it: `edits_applied` there must match the real one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from conftest import free_port

pytestmark = [pytest.mark.http, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DEFAULT_ADDRESS = "127.0.0.1:8000"


@dataclass
class Step:
    command: str
    shown: list[str] = field(default_factory=list)  # the output lines the README shows for it


def quickstart_steps(readme: str) -> list[Step]:
    """The Quickstart section's ```sh commands, each with the output shown under it."""
    section = re.search(r"^## Quickstart\b.*?$(.*?)(?=^## )", readme, re.M | re.S)
    assert section, "README.md has no '## Quickstart' section"
    blocks = re.findall(r"^```sh\n(.*?)^```", section.group(1), re.M | re.S)
    assert blocks, "the Quickstart section has no ```sh block"
    steps: list[Step] = []
    for block in blocks:
        current: Step | None = None
        lines = iter(block.splitlines())
        for line in lines:
            if not line.strip():
                current = None
            elif line.lstrip().startswith("#"):
                if current is not None:
                    current.shown.append(line.lstrip()[1:].strip())
            else:
                command = line
                while command.endswith("\\"):  # a continued line: bash reads it whole
                    command += "\n" + next(lines)
                current = Step(command)
                steps.append(current)
    return steps


def shown_edits(shown: list[str]) -> list[str] | None:
    """The `edits_applied` list of a JSON answer the README shows, if it shows one."""
    for line in shown:
        match = re.search(r'"edits_applied":\s*(\[[^\]]*\])', line)
        if match:
            return json.loads(match.group(1))
    return None


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "lks serve exited before it was ready"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"lks serve was not ready within {timeout} s")


def test_readme_quickstart_edits_a_fact(tmp_path: Path) -> None:
    steps = quickstart_steps(README.read_text())
    commands = [s.command.split("#")[0].strip() for s in steps]
    assert "make serve" in commands, "the quickstart starts the server with `make serve`"
    assert any(c.startswith(".venv/bin/lks train") for c in commands), commands
    facts_file = re.search(r"--facts\s+(\S+)", "\n".join(commands))
    assert facts_file, "the quickstart trains from a facts file"
    targets = {
        fact["subject"]: fact["target"]
        for fact in map(json.loads, (REPO / facts_file.group(1)).read_text().splitlines())
    }
    if not (REPO / ".venv/bin/lks").exists():
        pytest.skip("the quickstart runs .venv/bin/lks, which `make serve` / `make test` install")

    port = free_port()
    env = {
        **os.environ,
        "LKS_PACKS_DIR": str(tmp_path / "packs"),  # a fresh store, not the checkout's packs/
        "LKS_PORT": str(port),
        "LKS_LOG_LEVEL": "warning",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    # Two torch processes (the server, `lks train`) on a small shared CI machine: with one thread
    # each, training takes about 25 s; with torch's default they spin against each other and
    # other load, several times longer.
    env.setdefault("OMP_NUM_THREADS", "1")
    log = (tmp_path / "serve.log").open("wb")
    server: subprocess.Popen[bytes] | None = None
    answers: list[tuple[Step, dict]] = []  # type: ignore[type-arg]
    try:
        for step, command in zip(steps, commands, strict=True):
            if command == "make serve":
                serve = [sys.executable, "-m", "server.cli", "serve"]
                server = subprocess.Popen(serve, cwd=REPO, env=env, stdout=log, stderr=log)
                wait_ready(f"http://127.0.0.1:{port}", server)
                continue
            assert server is not None, f"{command!r} runs before the quickstart starts a server"
            run = step.command.replace(DEFAULT_ADDRESS, f"127.0.0.1:{port}")
            done = subprocess.run(
                ["bash", "-c", run], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
            )
            assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stderr[-3000:]}"
            if step.shown and not step.shown[0].startswith("{"):
                prefix = step.shown[0].split(":")[0]  # e.g. "published demo@1"
                assert prefix in done.stdout, (
                    f"{command}: README shows {prefix!r}, got {done.stdout}"
                )
            if "/v1/generate" in command:
                answers.append((step, json.loads(done.stdout)))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        log.close()

    assert answers, "the quickstart generates nothing"
    edited = [body for step, body in answers if "X-Edit-Pack" in step.command]
    assert edited, "no quickstart request names a pack"
    for step, body in answers:
        expected = shown_edits(step.shown)
        if expected is not None:
            assert body["edits_applied"] == expected, (step.command, body)
    for body in edited:
        assert body["edits_applied"], f"the pack applied no edit: {body}"
        for label in body["edits_applied"]:
            subject = label.split(":", 1)[1]
            assert targets[subject] in body["text"], (label, body["text"])
    unedited = [body for step, body in answers if "X-Edit-Pack" not in step.command]
    assert all(body["edits_applied"] == [] for body in unedited), unedited


def test_quickstart_parser_reads_commands_and_their_output() -> None:
    readme = (
        "# x\n## Quickstart: try it\n```sh\nmake serve   # terminal 1\n```\n\n```sh\n# terminal 2\n"
        "curl -s a \\\n     -d '{}'\n"
        '# {"text":" Rome",...,"edits_applied":["demo@1:Eiffel Tower"]}\n'
        "curl -s b\n```\n```\nnot run\n```\n## Next\n```sh\nnot in the quickstart\n```\n"
    )
    steps = quickstart_steps(readme)
    assert [shlex.split(s.command.split("#")[0])[:2] for s in steps] == [
        ["make", "serve"],
        ["curl", "-s"],
        ["curl", "-s"],
    ]
    assert steps[1].command == "curl -s a \\\n     -d '{}'"
    assert shown_edits(steps[1].shown) == ["demo@1:Eiffel Tower"]
    assert steps[2].shown == [] and shown_edits(steps[0].shown) is None
