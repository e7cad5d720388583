"""A slot KV cache for the decode step: one preallocated row of key/value columns per request.

Every layer keeps buffers `[slots, kv_heads, columns, head_dim]`. A request owns one slot for
its life: its prompt's keys and values are copied in once after its (eager, edited) prefill,
and each decode step writes one column per row at the row's own length. A row's token at column
c has position c, so there is no padding to track; the attention mask is `column <= length`.
Rows join by taking a free slot and leave by giving it back: no other row's cache moves, the
buffers keep their addresses (what a CUDA graph needs), and a decode step never concatenates.

The decode pass reads the first `B` slots and `W` columns, `B` and `W` rounded up to buckets, so
a compiled step sees few shapes. Free slots inside the first `B` run as padding rows (token 0 at
column 0 of their own slot); nothing reads what they write.

Buffers are allocated uninitialised, so memory is committed only where rows write (the CPU
allocator maps large blocks lazily); the columns a pass reads are zeroed once before their
first read, since masked columns still enter the attention product and must be finite.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from server.model.cpu_layout import has_packed_linears

log = logging.getLogger(__name__)

# The attention implementations whose masks the slot path can build (a 4D mask is passed as is).
SLOT_ATTENTION = ("sdpa", "eager")
MIN_COLUMNS = 64  # the narrowest width a compiled pass reads
INITIAL_COLUMNS = 512  # uninitialised, so a roomy start costs no memory on the CPU


def bucket(n: int, limit: int, *, minimum: int = 1) -> int:
    """`n` rounded up to a power of two (at least `minimum`), capped at `limit`."""
    size = max(minimum, 1 << max(0, n - 1).bit_length())
    return min(size, limit)


def row_bucket(n: int, limit: int) -> int:
    """Rows padded for a compiled step: 1, 2, 4, 8, then multiples of 8, capped at `limit`."""
    size = bucket(n, limit) if n <= 8 else -(-n // 8) * 8
    return min(size, limit)


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the slot path cannot serve `model` (None: it can)."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in SLOT_ATTENTION:
        return f"attention implementation {implementation!r} (slot masks are built for sdpa/eager)"
    return None


class SlotKV:
    """The per-layer key/value buffers and which columns of each slot are known finite."""

    def __init__(self, like: DynamicCache, slots: int, columns: int) -> None:
        self.slots = slots
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for layer in _prefill_layers(like):
            _, heads, _, key_dim = layer.keys.shape
            value_dim = layer.values.shape[3]
            self.keys.append(layer.keys.new_empty(slots, heads, columns, key_dim))
            self.values.append(layer.values.new_empty(slots, heads, columns, value_dim))
        self._clean = [0] * slots  # columns [0, clean) of a slot hold finite values
        self._static = False

    @property
    def columns(self) -> int:
        return int(self.keys[0].shape[2])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def mark_static(self) -> None:
        """Tell torch.compile the buffers never move (CUDA graphs then read them in place)."""
        self._static = True
        for tensor in self.keys + self.values:
            torch._dynamo.mark_static_address(tensor)

    def reserve(self, columns: int, occupied: dict[int, int]) -> None:
        """Make room for `columns` per slot; growing copies only the written columns of the
        `occupied` slots (slot -> length), once per doubling."""
        if columns <= self.columns:
            return
        new_columns = bucket(columns, 1 << 62, minimum=MIN_COLUMNS)
        log.info("the slot KV cache grows to %d columns per row", new_columns)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_empty(old.shape[0], old.shape[1], new_columns, old.shape[3])
                for slot, length in occupied.items():
                    new[slot, :, :length] = old[slot, :, :length]
                buffers[i] = new
        self._clean = [min(clean, occupied.get(slot, 0)) for slot, clean in enumerate(self._clean)]
        if self._static:
            self.mark_static()

    def write_prompt(self, slot: int, cache: DynamicCache, row: int, length: int) -> None:
        """Copy row `row`'s last `length` columns of a left-padded prefill cache into `slot`."""
        for keys, values, layer in zip(self.keys, self.values, _prefill_layers(cache), strict=True):
            keys[slot, :, :length] = layer.keys[row, :, -length:]
            values[slot, :, :length] = layer.values[row, :, -length:]
        self._clean[slot] = max(self._clean[slot], length)

    def ensure_clean(self, rows: int, width: int) -> None:
        """Zero what a pass over the first `rows` slots and `width` columns would read unwritten."""
        for slot in range(rows):
            start = self._clean[slot]
            if start < width:
                for tensor in self.keys + self.values:
                    tensor[slot, :, start:width] = 0
                self._clean[slot] = width


class SlotCacheView(Cache):
    """What the model's attention layers see in a decode pass: `update` writes each row's new
    key and value at its column and returns the first `rows` slots, `width` columns wide."""

    def __init__(self, kv: SlotKV) -> None:
        # Not Cache.__init__: the layers live in `kv`, and the view is handed to the model as is.
        self.layers = []
        self.layer_class_to_replicate = None
        self.offloading = False
        self.kv = kv
        self.rows = torch.zeros(1, dtype=torch.long)  # [B]: 0..B-1, the slots this pass reads
        self.columns = torch.zeros(1, dtype=torch.long)  # [B] where each row writes this pass
        self.mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)  # [B, 1, 1, W]: W is the width read

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.kv.keys[layer_idx], self.kv.values[layer_idx]
        rows = key_states.shape[0]
        # Index assignment writes only the new column (a scatter_ here copied the whole buffer).
        keys[self.rows, :, self.columns] = key_states[:, :, 0]
        values[self.rows, :, self.columns] = value_states[:, :, 0]
        width = self.mask.shape[-1]
        return keys[:rows, :, :width], values[:rows, :, :width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.mask.shape[-1])

    def __repr__(self) -> str:
        return f"SlotCacheView(slots={self.kv.slots})"


def _prefill_layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers = list(cache.layers)
    for layer in layers:
        assert type(layer) in (DynamicLayer, DynamicSlidingWindowLayer), (
            f"the slot cache copies dynamic cache layers, got {type(layer).__name__}"
        )
        if type(layer) is DynamicSlidingWindowLayer:
            assert layer.cumulative_length == layer.keys.shape[2], (
                "a sliding-window prefill that dropped tokens cannot be copied into a slot"
            )
    return layers


class SlotDecoder:
    """The decode step over slots: eager, or compiled (`fullgraph`: the whole model in one graph).

    Compiled, the step pads the rows to a bucket (1, 2, 4, 8, then multiples of 8) and the
    columns it reads to a power of two, and marks both dimensions dynamic: one graph for one row
    and one for the rest, compiled on first use, so joins and leaves never recompile. On CUDA
    the mode is "reduce-overhead" (CUDA graphs, one per bucket) and the buffers are marked
    static, so a replay reads them in place. On a CPU only a lone row runs compiled
    (`compiled_rows` = 1): there the step is bound by Python and per-op overhead, which the graph
    removes, while several rows are bound by the matrix products, where a compiled graph (frozen,
    static or dynamic) measured no faster than eager; a backbone with oneDNN-packed linears
    (`cpu_layout.py`) is not compiled at all. A step that cannot compile falls back to eager,
    logged, for the life of the decoder.
    """

    def __init__(
        self, model: torch.nn.Module, slots: int, *, compile: bool = False, fullgraph: bool = True
    ) -> None:
        self.model = model
        self.slots = slots
        if compile and has_packed_linears(model):
            log.info(
                "the decode step runs eager: the backbone's linears are oneDNN-packed, which "
                "torch.compile cannot trace (and which decode as fast as a compiled step)"
            )
            compile = False
        self.compiled = compile
        on_cuda = next(model.parameters()).device.type == "cuda"
        # the most rows a step runs compiled; more run eager
        self.compiled_rows = slots if on_cuda else 1
        self.kv: SlotKV | None = None
        self._view: SlotCacheView | None = None
        self._shapes: set[tuple[int, int]] = set()
        # sdpa takes a boolean mask; eager attention an additive one
        self.bool_mask = model.config._attn_implementation == "sdpa"
        self._forward: Callable[..., torch.Tensor] = self._run
        if compile:
            if on_cuda:
                how: dict[str, Any] = {"mode": "reduce-overhead"}
            else:  # the weights become constants, prepacked for the CPU's matrix kernels
                how = {"options": {"freezing": True}}
            self._forward = torch.compile(self._run, fullgraph=fullgraph, **how)
            log.info(
                "the decode step compiles on first use of a shape (%s), up to %d rows",
                how,
                self.compiled_rows,
            )

    @property
    def compiled_shapes(self) -> frozenset[tuple[int, int]]:
        """The (rows, width) buckets the compiled step has run (each one graph)."""
        return frozenset(self._shapes)

    def join(self, cache: DynamicCache, rows: list[tuple[int, int, int]]) -> None:
        """Copy prefilled rows into their slots: (slot, row of `cache`, prompt length) each;
        `reserve` made room for their spans first."""
        assert self.kv is not None
        for slot, row, length in rows:
            self.kv.write_prompt(slot, cache, row, length)

    def reserve(self, like: DynamicCache, columns: int, occupied: dict[int, int]) -> None:
        """Room for rows of `columns` columns, allocated on first use from `like`'s layout."""
        if self.kv is None:
            self.kv = SlotKV(like, self.slots, bucket(columns, 1 << 62, minimum=INITIAL_COLUMNS))
            self._view = SlotCacheView(self.kv)
            if self.compiled and self.kv.keys[0].device.type == "cuda":
                self.kv.mark_static()
            log.info(
                "slot KV cache: %d rows x %d columns, %.1f MiB",
                self.slots,
                self.kv.columns,
                self.kv.nbytes() / 2**20,
            )
        self.kv.reserve(columns, occupied)

    def step(self, tokens: torch.Tensor, slots: list[int], lengths: list[int]) -> torch.Tensor:
        """One decode pass: `tokens[i]` goes to column `lengths[i]` of slot `slots[i]`; returns
        the next-token logits of each row, in the order given."""
        kv, view = self.kv, self._view
        assert kv is not None and view is not None
        rows = max(slots) + 1
        compiled = self.compiled and rows <= self.compiled_rows
        if compiled:
            rows = row_bucket(rows, self.slots)
            width = bucket(max(lengths) + 1, kv.columns, minimum=MIN_COLUMNS)
        else:
            width = max(lengths) + 1
        kv.ensure_clean(rows, width)
        device = tokens.device
        index = torch.tensor(slots, device=device)
        input_ids = torch.zeros(rows, dtype=torch.long, device=device)
        input_ids[index] = tokens
        columns = torch.zeros(rows, dtype=torch.long, device=device)
        columns[index] = torch.tensor(lengths, device=device)
        valid = torch.arange(width, device=device)[None, :] <= columns[:, None]
        mask = valid if self.bool_mask else _additive(valid, kv.keys[0].dtype)
        view.rows, view.columns, view.mask = (
            torch.arange(rows, device=device),
            columns,
            mask[:, None, None, :],
        )
        inputs = (input_ids[:, None], columns[:, None], view.mask)
        logits = self._compiled(inputs, rows, width) if compiled else self._run(*inputs)
        return logits[index]

    def _compiled(self, inputs: tuple[torch.Tensor, ...], rows: int, width: int) -> torch.Tensor:
        for tensor in inputs:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        torch._dynamo.maybe_mark_dynamic(inputs[2], 3)
        first = (rows, width) not in self._shapes
        self._shapes.add((rows, width))
        started = time.perf_counter()
        try:
            logits = self._forward(*inputs)
        except Exception:
            log.exception("the compiled decode step failed; decoding eager from now on")
            self.compiled = False
            self._forward = self._run
            return self._run(*inputs)
        if first:
            log.info(
                "decode step: first pass at %d rows x %d columns took %.2f s (compiles if new)",
                rows,
                width,
                time.perf_counter() - started,
            )
        return logits

    def _run(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            cache=self._view,
            use_cache=True,
        )
        return out.logits[:, -1]


def _additive(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Eager attention adds its mask: 0 where a column is read, the dtype's minimum elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    return torch.where(valid, zero, torch.finfo(dtype).min)
