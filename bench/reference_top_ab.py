"""(natural_edits.md 2r; needs `git show HEAD~1:server/editor/train.py > /work/scratch/ab/old_train.py`) A/B of a training epoch's steps in one process: HEAD's loss (exact KL, references through the
head every step) against the working tree's (top-k references computed once)."""

import importlib.util
import random
import sys
import time

import torch

sys.path.insert(0, "/work/main")
from server.editor import train
from server.editor.config import TrainConfig
from server.editor.train import Trainer
from server.evaluation.datasets import dataset_path, load_items
from server.model.loading import load_backbone
from server.settings import Settings

spec = importlib.util.spec_from_file_location("old_train", "/work/scratch/ab/old_train.py")
old = importlib.util.module_from_spec(spec)
sys.modules["old_train"] = old
spec.loader.exec_module(old)


class Stop(Exception):
    pass


captured = {}


def capture(self, hypernet, features, sequences, cached, batch, references=None):
    captured.update(
        hypernet=hypernet,
        features=features,
        sequences=sequences,
        cached=cached,
        references=references,
    )
    raise Stop


settings = Settings(dtype="float32")
backbone = load_backbone(settings)
items = load_items(dataset_path(settings.data_dir, "zsre"), "dev", 100)
trainer = Trainer(backbone, TrainConfig())
Trainer.loss, real = capture, Trainer.loss
try:
    trainer.train([it.fact for it in items])
except Stop:
    pass
Trainer.loss = real
c = captured
widths = [len(s.text.ids) - s.text.first_edit for s in c["sequences"]]
batches = train.epoch_batches(widths, 8, random.Random(0))
opt = torch.optim.AdamW(c["hypernet"].parameters(), lr=1e-3)


def epoch(fn):
    t = time.perf_counter()
    for b in batches:
        loss = fn(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t


new_fn = lambda b: real(
    trainer, c["hypernet"], c["features"], c["sequences"], c["cached"], b, c["references"]
)
old_fn = lambda b: old.Trainer.loss(
    trainer, c["hypernet"], c["features"], c["sequences"], c["cached"], b
)
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
    print(
        f"round {r}: old {epoch(old_fn):.2f} s, new {epoch(new_fn):.2f} s ({len(batches)} steps)",
        flush=True,
    )
if len(sys.argv) > 2:
    from torch.profiler import ProfilerActivity, profile

    for name, fn in (("old", old_fn), ("new", new_fn)):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            epoch(fn)
        print(name)
        print(
            prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=45
            )
        )
