"""Where 30 training steps (5-34) of 100 zsRE dev facts spend their matrix products: the
output head's (a 49,152-wide operand) against the layers' (natural_edits.md 2q).

    PYTHONPATH=. .venv/bin/python bench/step_split.py
"""

from __future__ import annotations

import contextlib
import time

from torch.profiler import ProfilerActivity, profile

from server.editor import train
from server.editor.config import TrainConfig
from server.editor.train import Progress, Trainer
from server.evaluation.datasets import dataset_path, load_items
from server.model.loading import load_backbone
from server.settings import Settings


class Stop(Exception):
    pass


def main() -> None:
    settings = Settings(dtype="float32")
    backbone = load_backbone(settings)
    items = load_items(dataset_path(settings.data_dir, "zsre"), "dev", 100)
    profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    times = {}

    def progress(event: Progress) -> None:
        if event.step == 5:
            times["start"] = time.perf_counter()
            profiler.start()
        if event.step == 35:
            profiler.stop()
            times["end"] = time.perf_counter()
            raise Stop

    batches = train.epoch_batches

    def first_epoch(widths: list[int], *args: object) -> list[list[int]]:
        chosen = batches(widths, *args)  # type: ignore[arg-type]
        if "padded" not in times:
            times["padded"] = sum(max(widths[i] for i in b) * len(b) for b in chosen)
            print(
                f"an epoch: {len(widths)} sequences, {sum(widths) / len(widths):.1f} tokens each "
                f"from the first edit on, {1 - sum(widths) / times['padded']:.0%} of the "
                "batches' tokens padding"
            )
        return chosen

    train.epoch_batches = first_epoch  # type: ignore[assignment]
    with contextlib.suppress(Stop):
        Trainer(backbone, TrainConfig()).train([it.fact for it in items], progress)
    head = layers = 0.0
    for event in profiler.key_averages(group_by_input_shape=True):
        if event.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            if "49152" in str(event.input_shapes):
                head += event.self_cpu_time_total / 1e6
            else:
                layers += event.self_cpu_time_total / 1e6
    total = sum(e.self_cpu_time_total for e in profiler.key_averages()) / 1e6
    print(
        f"30 steps: {times['end'] - times['start']:.1f} s profiled, {total:.1f} s of ops: "
        f"head products {head:.1f} s, the layers' products {layers:.1f} s"
    )


if __name__ == "__main__":
    main()
