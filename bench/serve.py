"""Serving benchmark: `lks serve` on loopback against plain Hugging Face `generate`.

All figures are measured in one run on the same machine and model:
- baseline: `model.generate` on the model loaded plainly (`from_pretrained(..., dtype=float32)`,
  in this process, not the server's), one request at a time (greedy, exactly T new tokens),
  taking turns with the server's concurrency-1 requests so that drift of the machine's load
  falls on both alike;
- the server (a real `lks serve` process, its default settings unless the environment sets
  others) at concurrency 1 and 16 with no pack, one 1,000-subject pack, and (at 16) 4 packs of
  250 subjects mixed request by request.
Every prompt names an edited subject (zsRE test items), so the packs' detection, gate and edits
are on the measured path. Packs are synthetic (random blocks, real gate tables from the items'
prompts): throughput does not depend on what an edit says. Outputs a Markdown table and the
checks of the serving issue; `--json` writes one JSON object per row.

    .venv/bin/python bench/serve.py [--tokens 64] [--requests 16] [--json bench/serve.jsonl]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import torch
from harness import hf_generate_latencies, start_server
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.builder.edits import backbone_info
from server.evaluation.datasets import dataset_path, load_items
from server.gate.encoder import SentenceEncoder
from server.gate.table import GateTable
from server.model import Backbone, load_backbone
from server.packs import PackContent, PackStore, SubjectEntry
from server.settings import Settings

log = logging.getLogger("bench.serve")
CONCURRENCY = (1, 16)


@dataclass
class Row:
    config: str
    concurrency: int
    requests: int
    tokens_per_s: float
    p50_latency_s: float
    p99_latency_s: float
    p50_ttft_s: float
    ratio_to_hf: float = 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def build_pack(
    store: PackStore,
    name: str,
    backbone: Backbone,
    encoder: SentenceEncoder,
    items: list,
    seed: int,
) -> None:
    subjects = list(dict.fromkeys(it.subject for it in items))
    row_of = {s: i for i, s in enumerate(subjects)}
    gate = GateTable.build(
        encoder,
        [it.prompt for it in items],
        [[it.subject] for it in items],
        [row_of[it.subject] for it in items],
        targets=[it.target for it in items],
    )
    blocks = (
        torch.randn(
            len(subjects), backbone.hidden_size, generator=torch.Generator().manual_seed(seed)
        )
        * 2.0
    )
    content = PackContent(
        layer=round(0.6 * backbone.num_layers),
        subjects=[SubjectEntry(s) for s in subjects],
        table={"blocks": blocks, **gate.to_tensors()},
        hypernet={"weight": torch.eye(4)},
        facts=[{"subject": it.subject, "prompt": it.prompt, "target": it.target} for it in items],
    )
    store.publish(name, content, backbone_info(backbone))


def hf_baseline(latencies: list[float], tokens: int) -> Row:
    """Hugging Face `generate`'s row from its requests' latencies."""
    total = sum(latencies)
    return Row(
        "HF generate (no server)",
        1,
        len(latencies),
        len(latencies) * tokens / total,
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        float("nan"),
        1.0,
    )


async def one_request(
    client: httpx.AsyncClient, prompt: str, pack: str | None, tokens: int
) -> tuple[float, float, int]:
    body = {"prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "stream": True}
    headers = {"X-Edit-Pack": pack} if pack else {}
    started = time.perf_counter()
    ttft, generated = float("nan"), 0
    async with client.stream("POST", "/v1/generate", json=body, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["text"] and ttft != ttft:
                ttft = time.perf_counter() - started
            if "finish_reason" in event:
                generated = event["tokens"]
    return time.perf_counter() - started, ttft, generated


@dataclass
class Done:
    label: str
    latency: float
    ttft: float
    tokens: int


async def load_run(
    url: str, work: list[tuple[str, str, str | None]], concurrency: int, tokens: int
) -> tuple[float, list[Done]]:
    """Run (label, prompt, pack) requests with `concurrency` clients; wall time and records."""
    queue: asyncio.Queue[tuple[str, str, str | None]] = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    done: list[Done] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            label, prompt, pack = queue.get_nowait()
            done.append(Done(label, *await one_request(client, prompt, pack, tokens)))

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - started, done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency unit")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON lines here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    settings = Settings()
    backbone = load_backbone(settings)
    items = [it.fact for it in load_items(dataset_path(settings.data_dir, "zsre"), "test", 1000)]
    packs_dir = Path(tempfile.mkdtemp(prefix="lks-bench-packs-"))
    store = PackStore(packs_dir)
    encoder = SentenceEncoder()
    log.info("building packs: one of 1,000 subjects, four of 250")
    build_pack(store, "bench-1k", backbone, encoder, items, seed=0)
    for i in range(4):
        build_pack(store, f"bench-mix{i}", backbone, encoder, items[i * 250 : (i + 1) * 250], i + 1)

    prompts = [it.prompt for it in items]
    served_dtype = str(backbone.dtype).removeprefix("torch.")  # what the server's `auto` picks
    model_dir = backbone.model_dir
    assert model_dir is not None
    del backbone
    log.info("baseline: Hugging Face generate on the model as from_pretrained gives it")
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf_generate_latencies(hf_model, hf_tokenizer, prompts[:1], 4)  # warm-up
    rows: list[Row] = []

    process = start_server(packs_dir, args.port)
    url = f"http://127.0.0.1:{args.port}"
    try:
        asyncio.run(load_run(url, [("warm-up", prompts[0], "bench-1k")] * 4, 2, 4))
        mixed = sorted(range(1000), key=lambda i: (i % 250, i // 250))  # the 4 packs take turns
        configs: dict[str, list[tuple[str, str, str | None]]] = {
            "no pack": [("no pack", p, None) for p in prompts],
            "1,000-subject pack": [("1,000-subject pack", p, "bench-1k") for p in prompts],
        }
        mixed_work = [("4 packs mixed", prompts[i], f"bench-mix{i // 250}") for i in mixed]

        # concurrency 1: HF generate, no pack and the pack take turns request by request, so
        # that drift of the machine falls on all three alike; a rate is tokens over the time
        # its requests took
        count = args.requests
        log.info(
            "concurrency 1: %d requests each, HF generate, no pack and the pack in turn", count
        )
        hf_latencies: list[float] = []
        done: list[Done] = []
        for i in range(count):
            hf_latencies += hf_generate_latencies(
                hf_model, hf_tokenizer, [prompts[i]], args.tokens, warm_up=False
            )
            pair = [configs["no pack"][i], configs["1,000-subject pack"][i]]
            done += asyncio.run(load_run(url, pair, 1, args.tokens))[1]
        baseline = hf_baseline(hf_latencies, args.tokens)
        rows.append(baseline)

        def record(label: str, concurrency: int, rate: float, done: list[Done]) -> None:
            mine = [d for d in done if d.label == label]
            assert sum(d.tokens for d in mine) == len(mine) * args.tokens
            latencies = [d.latency for d in mine]
            rows.append(
                Row(
                    label,
                    concurrency,
                    len(mine),
                    rate,
                    percentile(latencies, 0.5),
                    percentile(latencies, 0.99),
                    statistics.median(d.ttft for d in mine),
                    rate / baseline.tokens_per_s,
                )
            )

        for label in ("no pack", "1,000-subject pack"):
            mine = [d for d in done if d.label == label]
            record(label, 1, sum(d.tokens for d in mine) / sum(d.latency for d in mine), done)
        for concurrency in CONCURRENCY[1:]:
            count = args.requests * concurrency // 2
            for name, work in [*configs.items(), ("4 packs mixed", mixed_work)]:
                log.info("%s at concurrency %d: %d requests", name, concurrency, count)
                elapsed, done = asyncio.run(load_run(url, work[:count], concurrency, args.tokens))
                record(name, concurrency, sum(d.tokens for d in done) / elapsed, done)
    finally:
        process.terminate()
        process.wait(timeout=30)

    print(
        f"\nmodel {settings.model_name}, {args.tokens} new tokens per request, "
        f"{torch.get_num_threads()} CPU threads; server in {served_dtype}, decode step "
        f"{'compiled' if settings.compile_decode else 'eager'}\n"
    )
    print(
        "| config | concurrency | requests | tokens/s | x HF generate | p50 latency s | "
        "p99 latency s | p50 TTFT s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.config} | {r.concurrency} | {r.requests} | {r.tokens_per_s:.1f} | "
            f"{r.ratio_to_hf:.2f} | {r.p50_latency_s:.2f} | {r.p99_latency_s:.2f} | "
            f"{r.p50_ttft_s:.3f} |"
        )
    by = {(r.config, r.concurrency): r.tokens_per_s for r in rows}
    checks = {
        "c=1: no pack / HF generate >= 1.8": by[("no pack", 1)] / baseline.tokens_per_s,
        "c=16: no pack / HF generate >= 11": by[("no pack", 16)] / baseline.tokens_per_s,
        "c=1: 1,000-subject pack / no pack >= 0.97": by[("1,000-subject pack", 1)]
        / by[("no pack", 1)],
        "c=16: 1,000-subject pack / no pack >= 0.97": by[("1,000-subject pack", 16)]
        / by[("no pack", 16)],
        "c=16: 4 packs mixed / one pack >= 0.9": by[("4 packs mixed", 16)]
        / by[("1,000-subject pack", 16)],
    }
    print()
    for label, value in checks.items():
        bound = float(label.rsplit(">=", 1)[1])
        print(f"- {label}: {value:.2f} {'PASS' if value >= bound else 'FAIL'}")
    if args.json:
        with args.json.open("w") as out:
            for r in rows:
                out.write(json.dumps(asdict(r)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
