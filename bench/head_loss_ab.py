"""The head part of one training step in isolation (natural_edits.md 2s): 30 cross-entropy
and 160 KL positions (40 with the repetition term) through a column-major 49,152 x 576 head,
loss and backward, as autograd ran it before `server/editor/head_loss.py` and as HeadLoss
runs it, interleaved, twelve times each:

    PYTHONPATH=. .venv/bin/python bench/head_loss_ab.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from server.editor.head_loss import HeadLoss, HeadTerms
from server.model.cpu_layout import ColumnMajorLinear

VOCAB, HIDDEN, CE, KL = 49152, 576, 30, 160


def main() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    head = ColumnMajorLinear.from_linear(linear).requires_grad_(False)
    states = torch.randn(CE + KL, HIDDEN, requires_grad=True)
    references = torch.randn(KL, HIDDEN)
    avoided = KL // 4
    terms = HeadTerms(
        targets=torch.randint(VOCAB, (CE,)),
        kl_weights=torch.rand(KL) / KL,
        avoid_at=torch.arange(0, KL, 4),
        avoid_tokens=torch.randint(VOCAB, (avoided,)),
        avoid_weights=torch.full((avoided,), 1.0 / avoided),
    )

    def autograd_step() -> None:  # train.py's loss up to e66ebca, on this head
        every = head(torch.cat([states, references])).float()
        logits, reference = every[: CE + KL], every[CE + KL :].detach()
        loss = F.cross_entropy(logits[:CE], terms.targets)
        edited = logits[CE:].log_softmax(-1)
        unedited = reference.log_softmax(-1)
        kl = F.kl_div(edited, unedited, log_target=True, reduction="none").sum(-1)
        loss = loss + (terms.kl_weights * kl).sum()
        said = edited[terms.avoid_at, terms.avoid_tokens].exp().clamp(max=1 - 1e-6)
        loss = loss - (terms.avoid_weights * torch.log1p(-said)).sum()
        loss.backward()

    head_loss = HeadLoss(head)

    def fused_step() -> None:
        head_loss(states, references, terms).backward()

    steps: dict[str, Callable[[], None]] = {"autograd": autograd_step, "HeadLoss": fused_step}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(12):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    for name, took in times.items():
        print(f"{name}: median {statistics.median(took[2:]) * 1e3:.1f} ms (first two left out)")


if __name__ == "__main__":
    main()
