"""What the benchmarks share: a real `lks serve` process on loopback, the plain Hugging Face
`generate` baseline they are measured against, and the dataset slice a quality bench reads."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from server.evaluation.datasets import dataset_path, load_items
from server.evaluation.evaluate import EvalItem
from server.settings import Settings


def add_slice_arguments(parser: argparse.ArgumentParser) -> None:
    """--dataset, --split, --n, --offset: the items a quality bench reads (`slice_items`)."""
    parser.add_argument("--dataset", default="zsre")
    parser.add_argument("--split", default="dev", choices=("dev", "test"))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--offset", type=int, default=0)


def slice_items(args: argparse.Namespace, settings: Settings) -> list[EvalItem]:
    return load_items(
        dataset_path(settings.data_dir, args.dataset), args.split, args.n, args.offset
    )


def start_server(packs_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """`lks serve` on `port` with its pack store (and SQLite job store) in `packs_dir`; returns
    once it is ready (a compiled decode step compiles first: minutes on a CPU)."""
    env = {**os.environ, "LKS_PACKS_DIR": str(packs_dir), "LKS_LOG_LEVEL": "warning"}
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env=env
    )
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("lks serve did not become ready")


def hf_generate_latencies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    tokens: int,
    *,
    warm_up: bool = True,
) -> list[float]:
    """Seconds for each prompt through plain `model.generate`, one at a time, exactly `tokens`
    greedy new tokens each, after one warm-up call (as the server gets one) if `warm_up`."""
    device = model.device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )

    def generate(prompt: str, new_tokens: int) -> int:
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
        synchronize()
        return out.shape[1] - ids["input_ids"].shape[1]

    if warm_up:
        generate(prompts[0], 4)
    latencies = []
    for prompt in prompts:
        started = time.perf_counter()
        produced = generate(prompt, tokens)
        latencies.append(time.perf_counter() - started)
        assert produced == tokens, f"generate gave {produced} tokens, {tokens} asked"
    return latencies
