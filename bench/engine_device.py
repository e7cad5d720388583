"""Engine throughput on any device, with and without a 10,000-subject pack, at batch 1 and 32.

For machines the default model cannot travel to (a lent GPU takes 64 MiB of files): `--shape-of
DIR` builds a backbone with DIR's config and tokenizer and random weights, which costs the same
per token as the trained one. Every prompt names an edited subject, so detection and the edit
hook are on the measured path; the pack's blocks are random (no gate), as throughput does not
depend on what an edit says. Runs through `load_backbone` and `BatchEngine`, as `lks serve` does.

    .venv/bin/python bench/engine_device.py --shape-of ~/.cache/lks-server/<model> --device cuda
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from harness import hf_generate_latencies
from transformers import AutoConfig, AutoModelForCausalLM

from server.engine.engine import BatchEngine, EngineRequest
from server.engine.sampling import SamplingParams
from server.model import Backbone, load_backbone
from server.packs.edit_set import EditSet
from server.packs.format import SubjectEntry
from server.settings import Settings

log = logging.getLogger("bench.engine_device")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SYLLABLES = ("ka", "lo", "mi", "ra", "ven", "dor", "sel", "tu", "bri", "an", "gor", "fe", "lin")


def random_backbone_dir(shape_of: Path, into: Path) -> Path:
    """`shape_of`'s config and tokenizer with random weights, saved where load_backbone reads."""
    config = AutoConfig.from_pretrained(shape_of)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(into)
    for name in TOKENIZER_FILES:
        if (shape_of / name).is_file():
            shutil.copy(shape_of / name, into / name)
    return into


def subject_names(count: int) -> list[str]:
    """Distinct two-word names like 'Kalo Minven', many tokens each, as real subjects are."""
    words = ["".join(p).capitalize() for p in itertools.product(SYLLABLES, repeat=2)]
    pairs = itertools.product(words, repeat=2)
    names = [f"{a} {b}" for a, b in itertools.islice(pairs, count)]
    assert len(names) == count, f"only {len(names)} names can be made, {count} asked"
    return names


def timed_generate(engine: BatchEngine, requests: list[EngineRequest]) -> tuple[float, int]:
    synchronize = torch.cuda.synchronize if engine.backbone.device.type == "cuda" else None
    start = time.perf_counter()
    outputs = engine.generate(requests)
    if synchronize:
        synchronize()
    return time.perf_counter() - start, sum(o.tokens for o in outputs)


def run(backbone: Backbone, args: argparse.Namespace) -> list[dict]:
    names = subject_names(args.subjects)
    generator = torch.Generator().manual_seed(1)
    deltas = torch.randn(len(names), backbone.hidden_size, generator=generator)
    pack = EditSet(
        [SubjectEntry(n) for n in names],
        deltas.to(backbone.device, backbone.dtype),
        layer=backbone.num_layers // 2,
        ref="massive@1",
    )
    chooser = random.Random(0)
    prompts = [f"Where was {chooser.choice(names)} born? Answer:" for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    rows = []
    for batch in args.batch:
        engine = BatchEngine(backbone, max_batch_size=batch, compile_decode=args.compile)
        variants = [("no pack", ()), (f"{len(names):,}-subject pack", (pack,))]
        for _, sets in variants:  # warm-up
            engine.generate([EngineRequest(p, params, edit_sets=sets) for p in prompts[:batch]])
        if batch == 1:
            variants.insert(0, ("HF generate", ()))
        for label, sets in variants:
            requests = [EngineRequest(p, params, edit_sets=sets) for p in prompts]
            if label == "HF generate":
                seconds = sum(
                    hf_generate_latencies(backbone.model, backbone.tokenizer, prompts, args.tokens)
                )
                tokens = len(prompts) * args.tokens
            elif batch == 1:  # concurrency 1: one request after another
                pairs = [timed_generate(engine, [r]) for r in requests]
                seconds, tokens = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
            else:
                seconds, tokens = timed_generate(engine, requests)
            rows.append(
                {
                    "device": str(backbone.device),
                    "dtype": str(backbone.dtype).removeprefix("torch."),
                    "batch": batch,
                    "pack": label,
                    "subjects": len(names) if sets else 0,
                    "requests": len(requests),
                    "tokens": tokens,
                    "seconds": round(seconds, 3),
                    "tokens_per_second": round(tokens / seconds, 1),
                }
            )
            log.info("%s", rows[-1])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape-of", type=Path, help="model dir to copy the shape of")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--subjects", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--compile", action="store_true", help="compile the decode step")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON lines here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory() as scratch:
        model = random_backbone_dir(args.shape_of, Path(scratch)) if args.shape_of else None
        backbone = load_backbone(Settings(model=model, device=args.device))
        rows = run(backbone, args)
        if backbone.device.type == "cuda":
            peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            rows = [{**row, "cuda_peak_gib": peak} for row in rows]
    print("| device | dtype | batch | pack | tokens/s | x no pack |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    base = {r["batch"]: r["tokens_per_second"] for r in rows if r["pack"] == "no pack"}
    # ratios are against the engine with no pack at the same batch size
    for r in rows:
        ratio = r["tokens_per_second"] / base[r["batch"]]
        print(
            f"| {r['device']} | {r['dtype']} | {r['batch']} | {r['pack']} "
            f"| {r['tokens_per_second']} | {ratio:.3f} |"
        )
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
