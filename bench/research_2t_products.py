"""natural_edits.md 2t: the head's products in float32 and bfloat16 at a step's row count, and
the training copy's size in float32 and `mixed`.

    PYTHONPATH=. .venv/bin/python bench/research_2t_products.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from server.model import load_backbone, load_training_backbone
from server.settings import Settings


def milliseconds(step: Callable[[], object], repeats: int = 20) -> float:
    step()
    step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats * 1e3


def storage_gib(model: torch.nn.Module) -> float:
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(seen.values()) / 2**30


def main() -> None:
    torch.manual_seed(0)
    weight, rows = torch.randn(49152, 576) * 0.05, torch.randn(190, 576)
    gradient = torch.randn(190, 49152)
    weight_bf16, rows_bf16, gradient_bf16 = weight.bfloat16(), rows.bfloat16(), gradient.bfloat16()
    print(f"head forward float32 {milliseconds(lambda: rows @ weight.T):.1f} ms")
    print(f"head forward bfloat16 {milliseconds(lambda: rows_bf16 @ weight_bf16.T):.1f} ms")
    print(f"head backward float32 {milliseconds(lambda: gradient @ weight):.1f} ms")
    print(f"head backward bfloat16 {milliseconds(lambda: gradient_bf16 @ weight_bf16):.1f} ms")
    served = load_backbone(Settings())
    for precision in ("float32", "mixed"):
        copy = load_training_backbone(Settings(train_dtype=precision), served)
        print(f"training copy {precision}: {storage_gib(copy.model):.3f} GiB")


if __name__ == "__main__":
    main()
