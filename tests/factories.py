"""Small objects the tests build again and again."""

from __future__ import annotations

import torch

from server.packs.format import BackboneInfo, PackContent, SubjectEntry


def make_content(subjects: int = 3, hidden: int = 32, *, layer: int = 2) -> PackContent:
    names = [f"Subject {i}" for i in range(subjects)]
    generator = torch.Generator().manual_seed(subjects)
    return PackContent(
        layer=layer,
        subjects=[SubjectEntry(name, (name.upper(),)) for name in names],
        table={"blocks": torch.randn(subjects, hidden, generator=generator)},
        hypernet={"weight": torch.eye(hidden), "bias": torch.zeros(hidden)},
        facts=[{"subject": n, "prompt": f"{n} lives in", "target": "Paris"} for n in names],
        training={"epochs": 1},
        metrics={"reliability": 1.0},
    )


def make_backbone_info(fingerprint: str = "sha256:test") -> BackboneInfo:
    return BackboneInfo(name="tiny", fingerprint=fingerprint, model_type="llama")
