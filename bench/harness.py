"""What the benchmarks share: a real `lks serve` process on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx


def start_server(packs_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """`lks serve` on `port` with its pack store (and SQLite job store) in `packs_dir`; returns
    once it is ready."""
    env = {**os.environ, "LKS_PACKS_DIR": str(packs_dir), "LKS_LOG_LEVEL": "warning"}
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env=env
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("lks serve did not become ready")
