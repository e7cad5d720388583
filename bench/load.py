"""Load and soak test: many clients on loopback for a fixed time, generation with mixed packs
and fact submissions together, against a real `lks serve`.

Reports requests by status, p50/p99 latency, submissions accepted vs stored (none may be lost)
and the server's resident memory at the start and the end of the run (growth < 5% expected).
The queue bound makes some requests answer 503 under overload: those are counted, never 5xx
otherwise.

    .venv/bin/python bench/load.py [--clients 100] [--seconds 60] [--json bench/load.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import torch
from harness import start_server

from server.builder.edits import backbone_info
from server.model import load_backbone
from server.packs import PackContent, PackStore, SubjectEntry
from server.settings import Settings

log = logging.getLogger("bench.load")
SUBJECTS = ["France", "Germany", "Italy", "Spain", "Japan", "Brazil", "Canada", "Egypt"]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def make_packs(packs_dir: Path) -> list[str]:
    backbone = load_backbone(Settings())
    store = PackStore(packs_dir)
    names = []
    for i in range(3):
        blocks = (
            torch.randn(
                len(SUBJECTS), backbone.hidden_size, generator=torch.Generator().manual_seed(i)
            )
            * 2
        )
        content = PackContent(
            layer=18,
            subjects=[SubjectEntry(s) for s in SUBJECTS],
            table={"blocks": blocks},
            hypernet={"w": torch.zeros(1)},
            facts=[],
        )
        store.publish(f"load{i}", content, backbone_info(backbone))
        names.append(f"load{i}")
    return names


async def client(
    url: str,
    packs: list[str],
    until: float,
    rng: random.Random,
    statuses: Counter[str],
    latencies: list[float],
    submitted: list[int],
) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < until:
            subject = rng.choice(SUBJECTS)
            started = time.perf_counter()
            if rng.random() < 0.1:  # a fact submission
                name = f"{subject} {rng.randrange(10**9)}"
                fact = {"subject": name, "prompt": f"{name} is located in", "target": "Paris"}
                response = await http.post("/v1/packs/load-submissions/facts", json=fact)
                if response.status_code == 202:
                    submitted.extend(response.json()["fact_ids"])
                kind = "submit"
            else:
                pack = rng.choice([None, *packs])
                headers = {"X-Edit-Pack": pack} if pack else {}
                body = {"prompt": f"The capital of {subject} is", "max_tokens": 8}
                response = await http.post("/v1/generate", json=body, headers=headers)
                kind = "generate"
            latencies.append(time.perf_counter() - started)
            statuses[f"{kind} {response.status_code}"] += 1
            if response.status_code == 503:
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))


async def run(url: str, packs: list[str], clients: int, seconds: float) -> dict[str, object]:
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    submitted: list[int] = []
    until = time.monotonic() + seconds
    await asyncio.gather(
        *(
            client(url, packs, until, random.Random(i), statuses, latencies, submitted)
            for i in range(clients)
        )
    )
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        stored = (await http.get("/v1/packs/load-submissions/facts", params={"limit": 1})).json()[
            "total"
        ]
    latencies.sort()
    return {
        "statuses": dict(statuses),
        "requests": len(latencies),
        "p50_s": latencies[len(latencies) // 2],
        "p99_s": latencies[int(len(latencies) * 0.99)],
        "submissions_accepted": len(submitted),
        "facts_stored": stored,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=20, help="seconds at full load first")
    parser.add_argument("--port", type=int, default=8767)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    packs_dir = Path(tempfile.mkdtemp(prefix="lks-bench-load-"))
    packs = make_packs(packs_dir)
    process = start_server(packs_dir, args.port)
    url = f"http://127.0.0.1:{args.port}"
    try:
        # warm-up at full load: packs loaded, full-size batches and a training job have run,
        # so the measured growth is what the soak adds, not first-use allocations
        asyncio.run(run(url, packs, args.clients, args.warmup))
        rss_start = rss_bytes(process.pid)
        result = asyncio.run(run(url, packs, args.clients, args.seconds))
        rss_end = rss_bytes(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)
    result.update(
        rss_start_mb=rss_start / 2**20,
        rss_end_mb=rss_end / 2**20,
        rss_growth=(rss_end - rss_start) / rss_start,
        clients=args.clients,
        seconds=args.seconds,
    )
    server_errors = sum(
        n
        for k, n in result["statuses"].items()  # type: ignore[attr-defined]
        if k.split()[1].startswith("5") and not k.endswith("503")
    )
    print(json.dumps(result, indent=2))
    print(
        f"\n5xx other than 503: {server_errors}; submissions lost: "
        f"{result['submissions_accepted'] - result['facts_stored']}; "
        f"RSS growth {100 * result['rss_growth']:.1f}%"
    )  # type: ignore[operator]
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
