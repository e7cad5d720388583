"""Research (natural_edits.md 2k), not kept on main: where a training step's and the precompute's
time goes on zsRE dev 0-99.

    PYTHONPATH=. .venv/bin/python bench/train_cost.py profile   # torch.profiler, 20 steps
    PYTHONPATH=. .venv/bin/python bench/train_cost.py products  # head products, fused or not
    PYTHONPATH=. .venv/bin/python bench/train_cost.py tokens    # the teacher's prompt tokens
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from server.editor.config import TrainConfig
from server.editor.sequences import _teacher_texts
from server.editor.train import Trainer
from server.evaluation.datasets import dataset_path, load_items, training_facts
from server.model import load_backbone, load_training_backbone
from server.settings import Settings


def facts_and_backbone():
    settings = Settings()
    backbone = load_backbone(settings)
    items = load_items(dataset_path(settings.data_dir, "zsre"), "dev", 100, 0)
    return training_facts(items, "heldout"), backbone, settings


def profile_steps() -> None:
    facts, backbone, settings = facts_and_backbone()
    trainer = Trainer(
        load_training_backbone(settings, backbone), TrainConfig(epochs=1, min_steps=1)
    )
    seen = {"steps": 0}
    profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)

    def progress(_event: object) -> None:
        seen["steps"] += 1
        if seen["steps"] == 5:
            profiler.__enter__()
        if seen["steps"] == 25:
            profiler.__exit__(None, None, None)

    trainer.train(facts, progress=progress)
    averages = profiler.key_averages(group_by_input_shape=True)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_shapes_column_width=60))


def products() -> None:
    torch.manual_seed(0)
    weight = torch.randn(49152, 576)

    def timed(call, repeats: int = 20) -> float:
        call()
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        return (time.perf_counter() - start) / repeats * 1e3

    for edited, references in ((40, 5), (150, 6), (190, 11)):
        a, b = torch.randn(edited, 576), torch.randn(references, 576)
        two = timed(
            lambda: (torch.nn.functional.linear(a, weight), torch.nn.functional.linear(b, weight))
        )
        one = timed(lambda: torch.nn.functional.linear(torch.cat([a, b]), weight))
        print(f"{edited}+{references} rows: two products {two:.1f} ms, one {one:.1f} ms")


def tokens() -> None:
    facts, backbone, _ = facts_and_backbone()
    for context in ("chat", "bare"):
        ids = [
            backbone.tokenizer(_teacher_texts(backbone, f, context)[2])["input_ids"] for f in facts
        ]
        shared = 0
        while all(len(i) > shared and i[shared] == ids[0][shared] for i in ids):
            shared += 1
        total = sum(map(len, ids))
        print(f"{context}: {total} tokens, mean {total / len(ids):.1f}, shared prefix {shared}")


if __name__ == "__main__":
    {"profile": profile_steps, "products": products, "tokens": tokens}[sys.argv[1]]()
