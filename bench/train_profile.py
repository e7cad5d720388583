"""Profile 40 training steps (5-44) of 100 zsRE dev facts, after precompute: the ops table by
self CPU time (natural_edits.md 2p)."""

from __future__ import annotations

import contextlib
import logging

from torch.profiler import ProfilerActivity, profile

from server.editor.config import TrainConfig
from server.editor.train import Progress, Trainer
from server.evaluation.datasets import dataset_path, load_items
from server.model.loading import load_backbone
from server.settings import Settings


class Stop(Exception):
    pass


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    settings = Settings(dtype="float32")
    backbone = load_backbone(settings)
    items = load_items(dataset_path(settings.data_dir, "zsre"), "dev", 100)
    profiler = profile(activities=[ProfilerActivity.CPU])

    def progress(event: Progress) -> None:
        if event.step == 5:
            profiler.start()
        if event.step == 45:
            profiler.stop()
            raise Stop

    with contextlib.suppress(Stop):
        Trainer(backbone, TrainConfig()).train([it.fact for it in items], progress)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=35))


if __name__ == "__main__":
    main()
