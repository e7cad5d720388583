"""Training benchmark: wall time from POSTing N facts to the new pack version answering requests.

Starts a real `lks serve` (in-process worker, embedded SQLite store) on loopback, POSTs the first
N zsRE test items as facts to a fresh pack, follows the job, and stops the clock when a generate
request with the pack applies version 1. Prints a Markdown table (and JSON lines with --json).

    .venv/bin/python bench/train.py [--sizes 10 100 1000] [--json bench/train.jsonl]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import httpx
from harness import start_server

from server.evaluation.datasets import dataset_path, load_items
from server.settings import Settings

log = logging.getLogger("bench.train")


def post_to_live(url: str, pack: str, facts: list[dict[str, str]]) -> dict[str, float]:
    started = time.perf_counter()
    posted = httpx.post(f"{url}/v1/packs/{pack}/facts", json=facts, timeout=120)
    posted.raise_for_status()
    job_url = posted.json()["job_url"]
    while True:
        job = httpx.get(f"{url}{job_url}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    trained = time.perf_counter() - started
    if job["state"] != "succeeded":
        raise RuntimeError(f"job {job['id']} {job['state']}: {job['error']}")
    while True:
        probe = httpx.post(
            f"{url}/v1/generate",
            headers={"X-Edit-Pack": pack},
            json={"prompt": facts[0]["prompt"], "max_tokens": 1},
            timeout=60,
        )
        if probe.status_code == 200 and probe.json()["edits_applied"]:
            break
        time.sleep(0.05)
    live = time.perf_counter() - started
    return {
        "job_seconds": trained,
        "post_to_live_seconds": live,
        "reliability": job["metrics"].get("reliability", float("nan")),
        "probe_locality": job["metrics"].get("probe_locality", float("nan")),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    settings = Settings()
    path = dataset_path(settings.data_dir, "zsre")
    items = load_items(path, "test", max(args.sizes))
    facts = [
        {"subject": i.fact.subject, "prompt": i.fact.prompt, "target": i.fact.target} for i in items
    ]
    process = start_server(Path(tempfile.mkdtemp(prefix="lks-bench-train-")), args.port)
    rows = []
    try:
        for n in args.sizes:
            log.info("%d facts: POST -> live", n)
            result = post_to_live(f"http://127.0.0.1:{args.port}", f"bench-{n}", facts[:n])
            rows.append({"facts": n, **result})
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(
        "\n| facts | POST -> job done s | POST -> live s | reliability (own facts) | "
        "locality (held-out probes) |"
    )
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['facts']} | {row['job_seconds']:.1f} | {row['post_to_live_seconds']:.1f} "
            f"| {row['reliability']:.3f} | {row['probe_locality']:.3f} |"
        )
    if args.json:
        with args.json.open("w") as out:
            for row in rows:
                out.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
