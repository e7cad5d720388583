"""Batch surgery on a Hugging Face `DynamicCache`, between two decode steps: the engine's
continuous batching (the decode path of a model the slot cache cannot serve) adds rows that
were prefilled apart, and it and the editor's greedy answers drop rows that finished.

Rows are left-padded: a row's real tokens end at the last column, padding columns are masked
out by the attention mask, and rotary positions are already baked into the cached keys, so
padding more on the left never changes what a row attends to.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers = list(cache.layers)
    for layer in layers:
        if type(layer) is DynamicSlidingWindowLayer:
            # Exact while the window has not dropped anything (the server caps a request's
            # length at the window); after surgery its length is the columns it holds.
            assert layer.cumulative_length == layer.keys.shape[2], (
                "a sliding-window cache that dropped tokens cannot be re-batched"
            )
        else:
            assert type(layer) is DynamicLayer, (
                f"continuous batching needs dynamic cache layers, got {type(layer).__name__}"
            )
    return layers


def _sync_lengths(cache: DynamicCache) -> None:
    for layer in cache.layers:
        if type(layer) is DynamicSlidingWindowLayer:
            layer.cumulative_length = layer.keys.shape[2]


def left_pad(cache: DynamicCache, mask: torch.Tensor, columns: int) -> torch.Tensor:
    """Add `columns` masked columns on the left of every row; returns the widened mask."""
    if columns <= 0:
        return mask
    for layer in _layers(cache):
        keys, values = layer.keys, layer.values  # [B, heads, T, head_dim]
        pad_shape = (*keys.shape[:2], columns, keys.shape[3])
        layer.keys = torch.cat([keys.new_zeros(pad_shape), keys], dim=2)
        layer.values = torch.cat([values.new_zeros(pad_shape), values], dim=2)
    _sync_lengths(cache)
    return torch.cat([mask.new_zeros(mask.shape[0], columns), mask], dim=1)


def concat_rows(
    cache: DynamicCache, mask: torch.Tensor, other: DynamicCache, other_mask: torch.Tensor
) -> torch.Tensor:
    """Append the rows of `other` to `cache` (in place), padding the shorter on the left;
    returns the mask of the joined batch."""
    width = max(mask.shape[1], other_mask.shape[1])
    mask = left_pad(cache, mask, width - mask.shape[1])
    other_mask = left_pad(other, other_mask, width - other_mask.shape[1])
    for layer, extra in zip(_layers(cache), _layers(other), strict=True):
        layer.keys = torch.cat([layer.keys, extra.keys], dim=0)
        layer.values = torch.cat([layer.values, extra.values], dim=0)
    return torch.cat([mask, other_mask], dim=0)


def keep_rows(cache: DynamicCache, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Keep only `rows` (in place), then drop the leading columns no remaining row uses;
    returns the new mask."""
    mask = mask[rows]
    used = mask.any(dim=0).nonzero()
    first = int(used[0]) if used.numel() else mask.shape[1]
    for layer in _layers(cache):
        layer.keys = layer.keys[rows, :, first:]
        layer.values = layer.values[rows, :, first:]
    _sync_lengths(cache)
    return mask[:, first:]
