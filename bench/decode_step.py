"""The float32 training backbone's decode step at 1-64 rows (natural_edits.md 2q): on a host
whose memory is slow, a step's fixed cost (reading the weights) dominates small batches.

    PYTHONPATH=. .venv/bin/python bench/decode_step.py
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from server.model.loading import load_backbone
from server.settings import Settings


@torch.inference_mode()
def main() -> None:
    model = load_backbone(Settings(dtype="float32")).model
    for rows in (1, 8, 32, 64):
        cache = DynamicCache(config=model.config)
        model(
            input_ids=torch.randint(100, 1000, (rows, 60)),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        token = torch.randint(100, 1000, (rows, 1))
        for step in range(7):
            if step == 2:
                started = time.perf_counter()
            model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
        print(f"{rows} rows: {(time.perf_counter() - started) / 5 * 1e3:.0f} ms a step")


if __name__ == "__main__":
    main()
