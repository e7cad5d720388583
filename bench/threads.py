"""CPU threads benchmark: what a live helper thread with its own OpenMP team costs the engine.

One process, the default model, one row decoding. It times the engine's decode step and a plain
`DynamicCache` step, each in turn, first alone, then after a helper thread that stays alive (as
`asyncio.to_thread`'s workers do) has run one two-threaded matrix product, and in a fresh
process after a helper pinned to one thread (`pin_torch_threads`, what `lks serve` does) has
run the same product. A figure is the median of `--steps` steps.

    .venv/bin/python bench/threads.py [--steps 40]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import DynamicCache

from server.engine.engine import BatchEngine, EngineRequest
from server.engine.sampling import SamplingParams
from server.model import Backbone, load_backbone
from server.model.threads import pin_torch_threads
from server.settings import Settings

PROMPT = "What is the capital of France?"


def step_times(backbone: Backbone, steps: int) -> tuple[float, float]:
    """Median ms of (an engine decode step, a plain DynamicCache step), taken in turn."""
    engine = BatchEngine(backbone, max_batch_size=1)
    engine.add(EngineRequest(PROMPT, SamplingParams(max_tokens=steps + 8, ignore_eos=True)))
    ids = backbone.tokenizer(PROMPT, return_tensors="pt").input_ids
    cache = DynamicCache()
    with torch.inference_mode():
        token = backbone.model(input_ids=ids, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(4):
        engine.step()
    engine_ms, plain_ms = [], []
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()
        engine_ms.append(1e3 * (time.perf_counter() - started))
        started = time.perf_counter()
        with torch.inference_mode():
            logits = backbone.model(input_ids=token, cache=cache).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        plain_ms.append(1e3 * (time.perf_counter() - started))
    return statistics.median(engine_ms), statistics.median(plain_ms)


def helper_product() -> None:
    x = torch.randn(256, 576)
    (x @ torch.randn(576, 4096)).sum()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--case", choices=["unpinned", "pinned"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case is None:  # each case in a process of its own: a team, once made, stays
        print(f"{torch.get_num_threads()} CPU threads, median of {args.steps} steps\n")
        print("| helper thread | engine step ms | plain step ms |")
        print("|---|---|---|")
        for case in ("unpinned", "pinned"):
            command = [sys.executable, __file__, "--steps", str(args.steps), "--case", case]
            print(
                subprocess.run(command, check=True, capture_output=True, text=True).stdout, end=""
            )
        return 0
    full = torch.get_num_threads()
    backbone = load_backbone(Settings())
    if args.case == "unpinned":
        print("| none | {:.1f} | {:.1f} |".format(*step_times(backbone, args.steps)))
    pinned = args.case == "pinned"
    pin = functools.partial(pin_torch_threads, 1, default=full) if pinned else None
    with ThreadPoolExecutor(1, initializer=pin) as helper:
        helper.submit(helper_product).result()  # the helper thread stays alive
        label = "pinned to 1 thread" if pinned else f"on {full} threads"
        print(f"| alive, ran a product {label} | %.1f | %.1f |" % step_times(backbone, args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
