"""Running only the layers after the edit layer, from cached layer-L states.

The backbone is frozen, so everything up to layer L is computed once per training set; each
training step runs layers L+1.. only. Llama-style families (no work on the input embeddings
beyond the layers) run the tail directly; others fall back to the full model with the hook.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel

_TAIL_FAMILIES = {"llama", "mistral", "qwen2"}


class LayerTail:
    def __init__(self, model: PreTrainedModel, layer_index: int) -> None:
        self.model = model
        self.layer_index = layer_index
        self.direct = model.config.model_type in _TAIL_FAMILIES
        if self.direct:
            base = model.model
            # A shallow copy with its own module dict: shares every weight, changes nothing
            # on the served model.
            tail = copy.copy(base)
            tail._modules = dict(base._modules)
            tail.layers = nn.ModuleList(list(base.layers)[layer_index + 1 :])
            self._tail = tail

    def hidden_states(
        self, layer_states: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """layer_states [B, T, H] at the output of layer L -> final hidden states [B, T, H]."""
        assert self.direct, "this family runs the full model; use the edit hook instead"
        out = self._tail(inputs_embeds=layer_states, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state
