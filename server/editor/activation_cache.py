"""Training's cached activations, bounded in memory.

Each training sequence caches its layer-L states from the first edited position on and every
later layer's keys and values before it (a `SplitSequence`). At 10,000 facts that is several
GiB, so the cache packs every sequence into one flat buffer: in memory (on the backbone's
device) while it fits the budget, otherwise in a file mapped from disk, whose pages the OS
streams in per batch and may drop again under memory pressure.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from server.editor.split import CacheShape, SplitSequence

log = logging.getLogger(__name__)

STORE_DTYPE = torch.float32  # training reads these in float32 whatever the serving dtype


class ActivationCache:
    """Fixed-size entries, written once by the precompute pass and read by every step."""

    def __init__(
        self,
        shape: CacheShape,
        entries: list[tuple[int, int]],  # (length, cut) per sequence
        *,
        device: torch.device,
        model_dtype: torch.dtype,
        memory_budget_bytes: int,
        spill_dir: Path | None = None,
    ) -> None:
        self.shape = shape
        self.model_dtype = model_dtype
        self.cuts = [cut for _, cut in entries]
        self.lengths = [length for length, _ in entries]
        self.offsets = [0]
        for length, cut in entries:
            self.offsets.append(self.offsets[-1] + shape.numel(length, cut))
        total = self.offsets[-1]
        self.nbytes = total * STORE_DTYPE.itemsize
        self.path: Path | None = None  # a spill file still to remove
        self.on_disk = False
        if self.nbytes <= memory_budget_bytes:
            self.buffer = torch.empty(total, dtype=STORE_DTYPE, device=device)
            self.device = device
        else:
            handle, name = tempfile.mkstemp(prefix="lks-activations-", suffix=".f32", dir=spill_dir)
            os.ftruncate(handle, self.nbytes)  # sparse: disk fills as entries are written
            os.close(handle)
            self.buffer = torch.from_file(name, shared=True, size=total, dtype=STORE_DTYPE)
            self.device = torch.device("cpu")
            self.on_disk = True
            try:  # the mapping keeps the data: no file is left behind, even after a kill -9
                os.unlink(name)
            except OSError:  # a platform that cannot unlink an open file: close() removes it
                self.path = Path(name)
            log.info(
                "activation cache of %.1f GiB exceeds the %.1f GiB budget: mapped from %s",
                self.nbytes / 2**30,
                memory_budget_bytes / 2**30,
                name,
            )

    def __len__(self) -> int:
        return len(self.cuts)

    def put(self, index: int, part: SplitSequence) -> None:
        length, cut = self.lengths[index], self.cuts[index]
        assert part.cut == cut, f"sequence {index}: cut {part.cut} != planned {cut}"
        assert part.suffix_states.shape[0] == length - cut, f"sequence {index}: suffix length"
        pieces = [part.suffix_states.reshape(-1)]
        layers = zip(part.prefix_keys, part.prefix_values, strict=True)
        pieces += [t.reshape(-1) for kv in layers for t in kv]
        flat = torch.cat([p.to(STORE_DTYPE) for p in pieces]).to(self.device)
        span = self.offsets[index + 1] - self.offsets[index]
        assert flat.numel() == span, f"sequence {index}: {flat.numel()} floats, planned {span}"
        self.buffer[self.offsets[index] : self.offsets[index + 1]] = flat

    def get(self, index: int, device: torch.device) -> SplitSequence:
        """The entry as tensors on `device` (views into the buffer where it lives there)."""
        shape, cut = self.shape, self.cuts[index]
        flat = self.buffer[self.offsets[index] : self.offsets[index + 1]].to(device)
        suffix_numel = (self.lengths[index] - cut) * shape.hidden_size
        suffix = flat[:suffix_numel].view(-1, shape.hidden_size)
        kv_numel = shape.kv_heads * cut * shape.head_dim
        keys, values = [], []
        start = suffix_numel
        for _ in range(shape.tail_layers):
            for bucket in (keys, values):
                chunk = flat[start : start + kv_numel]
                bucket.append(chunk.view(shape.kv_heads, cut, shape.head_dim).to(self.model_dtype))
                start += kv_numel
        return SplitSequence(cut=cut, suffix_states=suffix, prefix_keys=keys, prefix_values=values)

    def close(self) -> None:
        """Drop the buffer and, when it spilled, its file."""
        self.buffer = torch.empty(0, dtype=STORE_DTYPE)
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
