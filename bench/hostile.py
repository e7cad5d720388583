"""Hostile neighbours: how long an ordinary request takes beside a client that floods the
server with costly prompts, against the same request alone, on a real `lks serve` process.

Floods, each for one measurement:
- `huge-gated`: 100,000-character prompts that repeat the subject of a gated pack (refused
  for their length after tokenising, off the engine thread);
- `many-mentions`: prompts that fit the context but name the subject 2,000 times (refused by
  LKS_MAX_SUBJECT_MATCHES after detection, off the engine thread);
- `long-prompt`: 6,000-token prompts without a subject, which run (prefilled in chunks of
  LKS_PREFILL_CHUNK_TOKENS while the ordinary request keeps decoding).

    .venv/bin/python bench/hostile.py [--requests 7] [--json docs/results/hostile.jsonl]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from harness import start_server
from serve import build_pack

from server.evaluation.datasets import dataset_path, load_items
from server.gate.encoder import SentenceEncoder
from server.model import load_backbone
from server.packs import PackStore
from server.settings import Settings

ORDINARY = {"prompt": "The capital of France is", "max_tokens": 16, "ignore_eos": True}


def ordinary_latencies(url: str, count: int) -> list[float]:
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        response = httpx.post(f"{url}/v1/generate", json=ORDINARY, timeout=600)
        response.raise_for_status()
        seconds.append(time.perf_counter() - started)
    return seconds


def beside_flood(url: str, body: dict, headers: dict, count: int) -> tuple[list[float], dict]:
    """Ordinary latencies while one client sends `body` back to back; the flood's statuses."""
    stop = threading.Event()
    statuses: dict[int, int] = {}

    def flood() -> None:
        while not stop.is_set():
            status = httpx.post(
                f"{url}/v1/generate", json=body, headers=headers, timeout=600
            ).status_code
            statuses[status] = statuses.get(status, 0) + 1

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    time.sleep(1.0)
    try:
        return ordinary_latencies(url, count), statuses
    finally:
        stop.set()
        sender.join(600)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=7)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    settings = Settings()
    backbone = load_backbone(settings)
    items = [it.fact for it in load_items(dataset_path(settings.data_dir, "zsre"), "test", 3)]
    subject = items[0].subject
    with tempfile.TemporaryDirectory() as packs:
        build_pack(PackStore(Path(packs)), "gated", backbone, SentenceEncoder(), items, seed=0)
        server = start_server(Path(packs), args.port)
        url = f"http://127.0.0.1:{args.port}"
        try:
            ordinary_latencies(url, 2)  # warm
            floods = {
                "huge-gated": ({"prompt": (f"Where is {subject}? " * 5000)[:100_000]}, True),
                "many-mentions": ({"prompt": f"{subject} " * 2000}, True),
                "long-prompt": ({"prompt": "The history of the city goes back. " * 750}, False),
            }
            rows = [{"flood": "none", "median_s": statistics.median(
                ordinary_latencies(url, args.requests)), "flood_statuses": {}}]  # fmt: skip
            for name, (body, gated) in floods.items():
                headers = {"X-Edit-Pack": "gated"} if gated else {}
                seconds, statuses = beside_flood(
                    url, {**body, "max_tokens": 4}, headers, args.requests
                )
                rows.append(
                    {"flood": name, "median_s": statistics.median(seconds),
                     "flood_statuses": statuses}
                )  # fmt: skip
        finally:
            server.terminate()
            server.wait(30)
    alone = rows[0]["median_s"]
    print("| flood | ordinary request, median s | vs alone | the flood's answers |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        ratio = row["median_s"] / alone
        print(
            f"| {row['flood']} | {row['median_s']:.3f} | {ratio:.2f}x | {row['flood_statuses']} |"
        )
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
