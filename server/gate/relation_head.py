"""The gate's relation head: a linear map on the sentence encoder's embeddings.

all-MiniLM-L6-v2 says how alike two sentences are; the gate needs something narrower: do two
masked prompts ask the same relation? A linear map fitted once on dev items of zsRE and
CounterFact (each edit prompt pulled towards its paraphrase and pushed from another question
about the same subject) sharpens exactly that. It ships as a 0.6 MB safetensors file beside this
module, with the threshold picked for it; `tools/fit_relation_head.py` rebuilds both.

Packs store the head they were built with, so a pack is scored the way it was calibrated even
after the shipped head changes; packs from before the head score with the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

HEAD_FILE = Path(__file__).with_name("relation_head.safetensors")
# The rule before the head: identity map, threshold fitted on raw MiniLM scores (dev items).
IDENTITY_THRESHOLD = 0.03


@dataclass(frozen=True)
class RelationHead:
    weight: torch.Tensor  # [E, E]: projected = normalize(embedding @ weight.T)
    threshold: float  # the gate opens at score >= threshold

    @classmethod
    def identity(cls, dim: int) -> RelationHead:
        return cls(torch.eye(dim), IDENTITY_THRESHOLD)

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[..., E] unit vectors -> [..., E] unit vectors in the relation space."""
        return F.normalize(embeddings @ self.weight.T, dim=-1)

    @classmethod
    def load(cls, path: Path = HEAD_FILE) -> RelationHead:
        if not path.is_file():
            raise FileNotFoundError(
                f"the gate's relation head {path} is missing: reinstall lks-server, "
                "or rebuild it with `make relation-head`"
            )
        tensors = load_file(str(path))
        weight = tensors["weight"].float()
        assert weight.ndim == 2 and weight.shape[0] == weight.shape[1], (
            f"relation head {path}: weight must be square, got {tuple(weight.shape)}"
        )
        return cls(weight, float(tensors["threshold"]))

    def save(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        tensors = {
            "weight": self.weight.contiguous(),
            "threshold": torch.tensor(self.threshold, dtype=torch.float32),
        }
        save_file(tensors, str(path), metadata=metadata or {})
