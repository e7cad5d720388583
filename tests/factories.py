"""Small objects the tests build again and again."""

from __future__ import annotations

import os

import torch

from server.builder.edits import backbone_info
from server.editor.config import TrainConfig
from server.editor.facts import Fact
from server.gate.encoder import SentenceEncoder
from server.gate.table import GateTable
from server.model import Backbone
from server.packs import PackStore
from server.packs.format import BackboneInfo, Manifest, PackContent, SubjectEntry

# Where the device-agnostic tests put their tiny models: `LKS_TEST_DEVICE=cuda` runs them on a
# GPU machine (CI has none).
TEST_DEVICE = os.environ.get("LKS_TEST_DEVICE", "cpu")

# Facts a random tiny model can learn: the subject ends each prompt, so its block reaches the
# answer.
TINY_FACTS = [
    Fact(
        subject="danielle darrieux", prompt="the mother tongue of danielle darrieux", target="red"
    ),
    Fact(subject="france", prompt="the capital of france", target="berlin"),
]
# The repetition and teacher terms are off: a random tiny model cannot learn to say a target
# exactly once, nor answer in a voice (tests of the terms set them); the real model's tests
# train with the default.
TINY_TRAIN = TrainConfig(
    layer=1,
    epochs=15,
    batch_size=2,
    lr=5e-2,
    prefixes=(),
    chat_variant=False,
    rephrase=False,
    stop_loss=0.0,
    repetition_weight=0.0,
    teacher_weight=0.0,
)


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


def publish_subject_pack(
    store: PackStore,
    name: str,
    backbone: Backbone,
    subjects: list[str],
    *,
    seed: int,
    scale: float = 20.0,
    gate_encoder: SentenceEncoder | None = None,
    target: str = "x",
) -> Manifest:
    """A pack of random but strong edits for `subjects` on `backbone` (no training): enough to
    prove which requests an edit reaches. With `gate_encoder`, a scope gate whose one edit
    prompt per subject is "<subject> is located in"."""
    generator = torch.Generator().manual_seed(seed)
    hidden = backbone.hidden_size
    blocks = torch.randn(len(subjects), hidden, generator=generator) * scale
    prompts = [f"{s} is located in" for s in subjects]
    table = {"blocks": blocks}
    if gate_encoder is not None:
        gate = GateTable.build(gate_encoder, prompts, [[s] for s in subjects], range(len(subjects)))
        table.update(gate.to_tensors())
    content = PackContent(
        layer=backbone.num_layers // 2,
        subjects=[SubjectEntry(s) for s in subjects],
        table=table,
        hypernet={"weight": torch.eye(hidden)},
        facts=[
            {"subject": s, "prompt": p, "target": target}
            for s, p in zip(subjects, prompts, strict=True)
        ],
    )
    return store.publish(name, content, backbone_info(backbone))
