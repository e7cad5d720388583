"""The one-off unedited passes training makes before its first step: the hypernetwork's input
(the layer-L feature state of each subject) and the layer-L states of every training sequence
up to its first edit, kept in the activation cache (a prefix many sequences share, such as the
chat template's system header, runs once). Training does not change them, so each step only
writes the deltas into the cached states and runs layers L+1.. (train.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from server.editor.activation_cache import ActivationCache
from server.editor.scope import (
    EncodedText,
    Scope,
    length_batches,
    pad_batch,
    shared_prefix_groups,
)
from server.editor.split import LayerSplit, PrefixSkippingSplit, prefix_cache
from server.model.backbone import Backbone

log = logging.getLogger(__name__)

DEFAULT_CACHE_BUDGET_BYTES = 4 * 2**30


@torch.inference_mode()
def feature_states(
    backbone: Backbone,
    split: LayerSplit,
    scope: Scope,
    batch_size: int = 32,
    *,
    rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """The hypernetwork's input: layer-L state of each subject's feature text's last token
    [S, H], or of the given subject `rows` only [len(rows), H]."""
    tokenizer = backbone.tokenizer
    wanted = scope.feature_texts if rows is None else [scope.feature_texts[r] for r in rows]
    texts = [EncodedText(tokenizer(t)["input_ids"], [], [], []) for t in wanted]
    features: list[torch.Tensor | None] = [None] * len(texts)
    for batch in length_batches([len(t.ids) for t in texts], batch_size):
        chunk = [texts[i] for i in batch]
        ids, mask = pad_batch(chunk, int(tokenizer.pad_token_id), backbone.device)
        hidden = split.states_at_layer(ids, mask)
        for row, index in enumerate(batch):
            features[index] = hidden[row, len(texts[index].ids) - 1].float()
    return torch.stack(features)  # type: ignore[arg-type]


@torch.inference_mode()
def split_sequences(
    backbone: Backbone,
    split: PrefixSkippingSplit,
    sequences: Sequence[EncodedText],
    *,
    memory_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
    spill_dir: Path | None = None,
    batch_size: int = 32,
) -> ActivationCache:
    """One unedited pass over every training sequence, cut at its first edited position."""
    cuts = [s.first_edit for s in sequences]
    cache = ActivationCache(
        split.cache_shape(),
        [(len(s.ids), cut) for s, cut in zip(sequences, cuts, strict=True)],
        device=backbone.device,
        model_dtype=backbone.dtype,
        memory_budget_bytes=memory_budget_bytes,
        spill_dir=spill_dir,
    )
    pad_id = int(backbone.tokenizer.pad_token_id)
    started, reported, done = time.perf_counter(), time.perf_counter(), 0
    for skipped, members in shared_prefix_groups(sequences, cuts):
        shared = (
            prefix_cache(backbone.model, sequences[members[0]].ids[:skipped]) if skipped else None
        )
        lengths = [len(sequences[i].ids) for i in members]
        for local in length_batches(lengths, batch_size):
            batch = [members[j] for j in local]
            rest = [EncodedText(sequences[i].ids[skipped:], [], [], []) for i in batch]
            ids, mask = pad_batch(rest, pad_id, backbone.device)
            parts = split.precompute(ids, mask, [cuts[i] for i in batch], shared)
            for index, part in zip(batch, parts, strict=True):
                cache.put(index, part)
            done += len(batch)
            if time.perf_counter() - reported > 60:  # large sets precompute for many minutes
                reported = time.perf_counter()
                log.info(
                    "precompute: %d of %d sequences, %.0f s",
                    done,
                    len(sequences),
                    reported - started,
                )
    return cache
