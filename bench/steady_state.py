"""Steady-state engine benchmark: `--rows` requests decoding at once, a new one joining as each
leaves (as a server at that concurrency runs), in one process with no HTTP in between.

Each request is a zsRE test prompt with 64 new tokens (`ignore_eos`). After a warm-up (and the
compiled step's compile, with `--compile`), the engine steps for `--seconds`; prints tokens/s of
the requests finished and how the time split between prefill (joining) and decode steps.

    .venv/bin/python bench/steady_state.py [--rows 16] [--seconds 40] [--compile] [--dtype auto] \
        [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from itertools import count

from server.engine.engine import BatchEngine, EngineEvent, EngineRequest, Finished
from server.engine.sampling import SamplingParams
from server.evaluation.datasets import dataset_path, load_items
from server.model import load_backbone
from server.settings import Settings

log = logging.getLogger("bench.steady_state")
TOKENS = 64


class TimedEngine(BatchEngine):
    """The engine with its prefill (joins) and decode steps timed."""

    prefill_s = 0.0
    decode_s = 0.0
    decode_steps = 0

    def _prefill_and_join(self, rows: list) -> None:  # type: ignore[type-arg]
        started = time.perf_counter()
        super()._prefill_and_join(rows)
        self.prefill_s += time.perf_counter() - started

    def _decode(self) -> None:
        started = time.perf_counter()
        super()._decode()
        self.decode_s += time.perf_counter() - started
        self.decode_steps += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--compile", action="store_true", help="the compiled decode step")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings = Settings(dtype=args.dtype)
    backbone = load_backbone(settings)
    items = load_items(dataset_path(settings.data_dir, "zsre"), "test", 200)
    prompts = [it.fact.prompt for it in items]
    engine = TimedEngine(backbone, max_batch_size=args.rows, compile_decode=args.compile)
    log.info("warm-up (compiles: %.1f s)", engine.warm_up())
    params = SamplingParams(max_tokens=TOKENS, ignore_eos=True)
    finished = [0]
    numbers = count()

    def sink(event: EngineEvent) -> None:
        if isinstance(event, Finished):
            finished[0] += 1

    def step() -> None:
        """One engine step, then a new request for each that finished."""
        before = finished[0]
        engine.step()
        for _ in range(finished[0] - before):
            request = EngineRequest(prompts[next(numbers) % len(prompts)], params)
            request.sink = sink
            engine.add(request)

    for _ in range(args.rows):  # one joins per step, so rows leave (and join) staggered
        request = EngineRequest(prompts[next(numbers) % len(prompts)], params)
        request.sink = sink
        engine.add(request)
        step()
    for _ in range(2 * TOKENS):  # past the first wave
        step()
    engine.prefill_s = engine.decode_s = 0.0
    engine.decode_steps, first = 0, finished[0]
    started = time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        step()
    elapsed = time.perf_counter() - started
    done = finished[0] - first
    result = {
        "dtype": str(backbone.dtype).removeprefix("torch."),
        "compiled": args.compile,
        "rows": args.rows,
        "tokens_per_s": round(done * TOKENS / elapsed, 1),
        "requests": done,
        "seconds": round(elapsed, 1),
        "prefill_s": round(engine.prefill_s, 1),
        "decode_s": round(engine.decode_s, 1),
        "decode_step_ms": round(1e3 * engine.decode_s / max(engine.decode_steps, 1), 1),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{result['dtype']} {'compiled' if args.compile else 'eager'}, {args.rows} rows: "
        f"{result['tokens_per_s']} tokens/s ({done} requests in {result['seconds']} s); "
        f"prefill {result['prefill_s']} s, decode {result['decode_s']} s "
        f"({result['decode_step_ms']} ms a step)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
