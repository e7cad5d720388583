"""Two versions of `Trainer.loss` timed in one training run, epoch by epoch in turn, so the
host's drift falls on both alike (whole runs on a shared host differ by more than a small
change saves). The other version is `Trainer.loss` as it stood at BASE (a commit):

    PYTHONPATH=. .venv/bin/python bench/loss_ab.py --base f8ee48a --epochs 8

Prints each version's median and mean step (its loss, backward and optimiser step).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.harness import add_slice_arguments, slice_items
from server.editor.config import TrainConfig
from server.editor.train import Progress, Trainer
from server.evaluation.datasets import training_facts
from server.model import load_backbone, load_training_backbone
from server.settings import Settings


def base_loss(commit: str) -> Callable[..., torch.Tensor]:
    source = subprocess.run(
        ["git", "show", f"{commit}:server/editor/train.py"], check=True, capture_output=True
    ).stdout
    with tempfile.TemporaryDirectory() as directory:  # needed only while it is imported
        path = Path(directory) / "base_train.py"
        path.write_bytes(source)
        spec = importlib.util.spec_from_file_location("base_train", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["base_train"] = module
        spec.loader.exec_module(module)
    return module.Trainer.loss  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_slice_arguments(parser)
    parser.add_argument("--base", required=True, help="the commit whose Trainer.loss to compare")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    settings = Settings()
    backbone = load_training_backbone(settings, load_backbone(settings))
    facts = training_facts(slice_items(args, settings), "heldout")
    trainer = Trainer(backbone, TrainConfig(epochs=args.epochs, min_steps=1, patience=99))
    versions = {"head": Trainer.loss, "base": base_loss(args.base)}
    steps: dict[str, list[float]] = {"head": [], "base": []}
    calls: list[tuple[str, float]] = []  # (version, start) of each loss call
    per_epoch: list[int] = []  # set by the first progress event

    def timed(*loss_args: object) -> object:
        epoch = len(calls) // per_epoch[0] if per_epoch else 0
        version = "head" if epoch % 2 == 0 else "base"
        now = time.perf_counter()
        if calls:  # the step before: its loss, backward and optimiser step
            steps[calls[-1][0]].append(now - calls[-1][1])
        calls.append((version, now))
        return versions[version](trainer, *loss_args)

    def progress(event: Progress) -> None:
        if not per_epoch:
            per_epoch.append(event.steps // event.epochs)

    trainer.loss = timed  # type: ignore[method-assign]
    trainer.train(facts, progress=progress)
    for name, times in steps.items():
        print(
            f"{name}: {len(times)} steps, median {statistics.median(times) * 1e3:.1f} ms, "
            f"mean {statistics.mean(times) * 1e3:.1f} ms"
        )


if __name__ == "__main__":
    main()
