"""Decode benchmark: the engine's tokens/s on the default model by dtype, decode step and batch.

Every configuration runs the same greedy requests (zsRE test prompts, exactly T new tokens,
`ignore_eos`) through `BatchEngine.generate` in this one process, after one untimed warm-up
pass of the same shapes (so a compiled step is compiled before it is timed). Configurations:
the serving dtype (float32, bfloat16), the decode step (eager, compiled) and the rows decoded
together (1, 16). Outputs a Markdown table; `--json` writes one JSON object per row.

    .venv/bin/python bench/decode.py [--tokens 64] [--dtypes float32 bfloat16] [--json out]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from server.engine.engine import BatchEngine, EngineRequest
from server.engine.sampling import SamplingParams
from server.lks.datasets import dataset_path, load_items
from server.model import load_backbone
from server.settings import Settings

log = logging.getLogger("bench.decode")


@dataclass
class Row:
    dtype: str
    step: str
    rows: int
    tokens_per_s: float
    ms_per_step: float


def measure(engine: BatchEngine, prompts: list[str], tokens: int) -> float:
    """Seconds to generate `tokens` for every prompt, all decoding together."""
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    started = time.perf_counter()
    results = engine.generate([EngineRequest(p, params) for p in prompts])
    elapsed = time.perf_counter() - started
    assert all(r.tokens == tokens for r in results)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--steps", nargs="+", default=["eager", "compiled"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    base = Settings()
    items = load_items(dataset_path(base.data_dir, "zsre"), "test", max(args.rows))
    prompts = [it.fact.prompt for it in items]
    results: list[Row] = []
    for dtype in args.dtypes:
        backbone = load_backbone(base.model_copy(update={"dtype": dtype}))
        for step in args.steps:
            for rows in args.rows:
                engine = BatchEngine(
                    backbone, max_batch_size=rows, compile_decode=step == "compiled"
                )
                measure(engine, prompts[:rows], args.tokens)  # warm-up: compiles, if it does
                elapsed = measure(engine, prompts[:rows], args.tokens)
                row = Row(
                    dtype, step, rows, rows * args.tokens / elapsed, 1e3 * elapsed / args.tokens
                )
                log.info("%s", row)
                results.append(row)
        del backbone
    print(
        f"\nmodel {base.model_name}, {args.tokens} new tokens, {torch.get_num_threads()} threads\n"
    )
    print("| dtype | decode step | rows | tokens/s | ms per step |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r.dtype} | {r.step} | {r.rows} | {r.tokens_per_s:.1f} | {r.ms_per_step:.1f} |")
    if args.json:
        with args.json.open("w") as out:
            for r in results:
                out.write(json.dumps(asdict(r)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
