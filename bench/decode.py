"""Decode benchmark: the engine's decode step on the default model, by dtype, step and rows.

Every configuration is an engine of its own holding `rows` greedy requests (zsRE test prompts,
`ignore_eos`); after a warm-up (a compiled step compiles there), the engines take one decode
step each in turn, round after round, so drift and load from other work on the machine fall on
all of them alike. A figure is the median step time (robust to a step stalled by another
process) and rows / that median as tokens/s. Configurations: the serving dtype (float32,
bfloat16), the decode step (eager or compiled on the slot cache; `dynamic`: eager on the
re-batched `DynamicCache`), the weights' layout (`packed`: as the server loads them, bfloat16
linears oneDNN-packed where the CPU can; `plain`: unpacked, as when training runs on the served
weights) and the rows decoded together (1, 16). Outputs a Markdown table; `--json` writes one
JSON object per row.

    .venv/bin/python bench/decode.py [--rounds 48] [--dtypes float32 bfloat16] \
        [--weights packed plain] [--json out]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from server.engine.engine import BatchEngine, EngineRequest
from server.engine.sampling import SamplingParams
from server.evaluation.datasets import dataset_path, load_items
from server.model import load_backbone
from server.settings import Settings

log = logging.getLogger("bench.decode")
WARM_UP_STEPS = 8


@dataclass
class Row:
    dtype: str
    weights: str
    step: str
    rows: int
    tokens_per_s: float
    median_ms_per_step: float
    p90_ms_per_step: float


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=48, help="timed steps per configuration")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument(
        "--steps",
        nargs="+",
        choices=["dynamic", "eager", "compiled"],
        default=["dynamic", "eager", "compiled"],
        help="dynamic: the re-batched DynamicCache; eager and compiled: the slot cache",
    )
    parser.add_argument("--weights", nargs="+", choices=["packed", "plain"], default=["packed"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    base = Settings()
    items = load_items(dataset_path(base.data_dir, "zsre"), "test", max(args.rows))
    prompts = [it.fact.prompt for it in items]
    params = SamplingParams(max_tokens=WARM_UP_STEPS + args.rounds + 2, ignore_eos=True)
    engines: dict[tuple[str, str, str, int], BatchEngine] = {}
    for dtype, weights in itertools.product(args.dtypes, args.weights):
        train_dtype = "serving" if weights == "plain" else "auto"  # trained on: not packed
        settings = base.model_copy(update={"dtype": dtype, "train_dtype": train_dtype})
        backbone = load_backbone(settings)
        for step in args.steps:
            for rows in args.rows:
                engine = BatchEngine(
                    backbone,
                    max_batch_size=rows,
                    slot_cache=step != "dynamic",
                    compile_decode=step == "compiled",
                )
                for prompt in prompts[:rows]:
                    engine.add(EngineRequest(prompt, params))
                for _ in range(WARM_UP_STEPS):
                    engine.step()
                assert engine.running == rows
                engines[(dtype, weights, step, rows)] = engine
                log.info("warm: %s %s %s %d rows", dtype, weights, step, rows)
    times: dict[tuple[str, str, str, int], list[float]] = {key: [] for key in engines}
    for _ in range(args.rounds):
        for key, engine in engines.items():
            started = time.perf_counter()
            engine.step()
            times[key].append(time.perf_counter() - started)
    results = []
    for (dtype, weights, step, rows), seconds in times.items():
        median = statistics.median(seconds)
        p90 = statistics.quantiles(seconds, n=10)[-1]
        results.append(Row(dtype, weights, step, rows, rows / median, 1e3 * median, 1e3 * p90))
    print(
        f"\nmodel {base.model_name}, {args.rounds} timed steps each, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(
        "| dtype | weights | decode step | rows | tokens/s | median ms per step | p90 ms per step |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.dtype} | {r.weights} | {r.step} | {r.rows} | {r.tokens_per_s:.1f} | "
            f"{r.median_ms_per_step:.1f} | {r.p90_ms_per_step:.1f} |"
        )
    if args.json:
        with args.json.open("w") as out:
            for r in results:
                out.write(json.dumps(asdict(r)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
