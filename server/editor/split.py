"""Running part of the backbone: the frozen work once, only what an edit changes per step.

Llama-style families (no work on the input embeddings beyond the layers) split directly: the
feature states need layers 0..L only, and a training step runs layers L+1.. only, and only on
positions from the first edit on. Other families run the full model with the edit hook.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

_SPLIT_FAMILIES = {"llama", "mistral", "qwen2"}


def _view(base: nn.Module, layers: list[nn.Module], *, keep_norm: bool) -> nn.Module:
    """A shallow copy of the base model with its own module dict: it shares every weight and
    changes nothing on the served model."""
    part = copy.copy(base)
    part._modules = dict(base._modules)
    part.layers = nn.ModuleList(layers)
    if not keep_norm:
        part.norm = nn.Identity()
    return part


class LayerSplit:
    def __init__(self, model: PreTrainedModel, layer_index: int) -> None:
        self.model = model
        self.layer_index = layer_index
        self.direct = model.config.model_type in _SPLIT_FAMILIES
        if self.direct:
            layers = list(model.model.layers)
            self._head = _view(model.model, layers[: layer_index + 1], keep_norm=False)
            self._tail = _view(model.model, layers[layer_index + 1 :], keep_norm=True)

    def states_at_layer(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Output of decoder layer L [B, T, H], running layers 0..L only where the family allows."""
        if self.direct:
            out = self._head(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.last_hidden_state
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        )
        return out.hidden_states[self.layer_index + 1]  # [0] is the embeddings


def prefix_cache(model: PreTrainedModel, prefix_ids: Sequence[int]) -> DynamicCache:
    """Every layer's keys and values of a prefix many sequences share (a chat template's
    system header), from one pass without the output head: computed once instead of once per
    sequence."""
    ids = torch.tensor([list(prefix_ids)], device=model.device)
    return model.base_model(input_ids=ids, use_cache=True).cache


@dataclass
class SplitSequence:
    """What training needs of one sequence, from one unedited pass: the layer-L states from the
    first edited position on, and every later layer's keys and values before it (which no edit
    can change, so each step attends to them instead of recomputing them)."""

    cut: int  # first edited position
    suffix_states: torch.Tensor  # [T - cut, H] layer-L output from the cut on
    prefix_keys: list[torch.Tensor]  # per layer after L: [kv_heads, cut, head_dim]
    prefix_values: list[torch.Tensor]


@dataclass(frozen=True)
class CacheShape:
    """What one sequence's cached `SplitSequence` holds, from the backbone's config."""

    hidden_size: int
    tail_layers: int  # layers after the edit layer, whose prefix keys/values are cached
    kv_heads: int
    head_dim: int

    def numel(self, length: int, cut: int) -> int:
        """Floats for a sequence of `length` tokens whose first edit is at `cut`."""
        assert 0 <= cut < length, f"cut {cut} must lie inside the sequence (length {length})"
        suffix = (length - cut) * self.hidden_size
        return suffix + 2 * self.tail_layers * self.kv_heads * cut * self.head_dim


class PrefixSkippingSplit(LayerSplit):
    """LayerSplit whose training steps run layers L+1.. only on positions from the first edit on.

    Positions before an edit see exactly what the unedited model sees, so their keys and values
    are computed once; a step pays only for the rest. Needs full attention (no sliding window).
    """

    @staticmethod
    def supports(model: PreTrainedModel) -> bool:
        config = model.config
        sliding = getattr(config, "sliding_window", None) and getattr(
            config, "use_sliding_window", True
        )
        return config.model_type in _SPLIT_FAMILIES and not sliding

    def cache_shape(self) -> CacheShape:
        config = self.model.config
        heads = config.num_attention_heads
        return CacheShape(
            hidden_size=config.hidden_size,
            tail_layers=config.num_hidden_layers - self.layer_index - 1,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        )

    def precompute(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cuts: list[int],
        shared: DynamicCache | None = None,
    ) -> list[SplitSequence]:
        """One unedited pass over a right-padded batch, cut per row. With `shared` (the cache
        of a prefix every row starts with), the ids and mask hold only what follows it; cuts
        and the returned sequences still count from the first token."""
        batch = input_ids.shape[0]
        skipped = shared.get_seq_length() if shared is not None else 0
        cache = None
        if shared is not None:
            cache = DynamicCache(config=self.model.config)
            for index, layer in enumerate(shared.layers):
                cache.update(
                    layer.keys.expand(batch, -1, -1, -1).contiguous(),
                    layer.values.expand(batch, -1, -1, -1).contiguous(),
                    index,
                )
            attention_mask = torch.cat([attention_mask.new_ones(batch, skipped), attention_mask], 1)
        positions = torch.arange(skipped, skipped + input_ids.shape[1], device=input_ids.device)
        out = self.model.model(  # the base model: no logits needed here
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions.expand(batch, -1),
            cache=cache,
            use_cache=True,
            output_hidden_states=True,
        )
        states = out.hidden_states[self.layer_index + 1]  # [B, T - skipped, H]
        lengths = attention_mask.sum(-1).tolist()
        tail_layers = range(self.layer_index + 1, len(out.cache.layers))
        result = []
        for row, cut in enumerate(cuts):
            assert cut >= skipped, f"row {row}: edit at {cut} inside the shared prefix"
            result.append(
                SplitSequence(
                    cut=cut,
                    suffix_states=states[row, cut - skipped : lengths[row] - skipped]
                    .float()
                    .clone(),
                    prefix_keys=[
                        out.cache.layers[i].keys[row, :, :cut].clone() for i in tail_layers
                    ],
                    prefix_values=[
                        out.cache.layers[i].values[row, :, :cut].clone() for i in tail_layers
                    ],
                )
            )
        return result

    def suffix_final_states(
        self, sequences: list[SplitSequence], suffix_states: torch.Tensor
    ) -> torch.Tensor:
        """suffix_states [B, S, H] (right-padded, edits applied) -> final states [B, S, H]."""
        batch, width = suffix_states.shape[:2]
        device = suffix_states.device
        prefix = max(s.cut for s in sequences)
        kv_heads, head_dim = (
            sequences[0].prefix_keys[0].shape[0],
            sequences[0].prefix_keys[0].shape[2],
        )
        cache = DynamicCache(config=self.model.config)
        dtype = self.model.dtype
        for j, layer in enumerate(range(self.layer_index + 1, self.model.config.num_hidden_layers)):
            keys = torch.zeros(batch, kv_heads, prefix, head_dim, device=device, dtype=dtype)
            values = torch.zeros_like(keys)
            for row, seq in enumerate(sequences):  # left-pad each prefix to the longest
                keys[row, :, prefix - seq.cut :] = seq.prefix_keys[j]
                values[row, :, prefix - seq.cut :] = seq.prefix_values[j]
            cache.update(keys, values, layer)
        # [B, 1, S, prefix + S]: a query sees its own row's real prefix and the suffix up to itself
        key_index = torch.arange(prefix + width, device=device)
        query_index = torch.arange(width, device=device)
        cuts = torch.tensor([s.cut for s in sequences], device=device)
        sizes = torch.tensor([s.suffix_states.shape[0] for s in sequences], device=device)
        in_prefix = (key_index[None, :] < prefix) & (key_index[None, :] >= (prefix - cuts)[:, None])
        suffix_key = key_index - prefix
        causal = (suffix_key[None, :] <= query_index[:, None]) & (suffix_key[None, :] >= 0)
        real = suffix_key[None, :] < sizes[:, None]
        mask = in_prefix[:, None, :] | (causal[None] & real[:, None, :])
        positions = cuts[:, None] + query_index[None, :]
        out = self._tail(
            inputs_embeds=suffix_states.to(dtype),
            attention_mask=mask[:, None],
            position_ids=positions,
            cache=cache,
            use_cache=False,
        )
        return out.last_hidden_state
