"""The family adapter: what the rest of the code needs to know about a causal LM.

Llama, Mistral, Qwen2 and GPT-2 families keep their decoder layers in different places and name
their sizes differently; this module is the one place that knows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from server.model.hook import EditHooks

# model_type -> attribute path of the decoder layer list
_LAYER_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gpt2": "transformer.h",
}
_FALLBACK_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")

# Config keys that vary with how a checkpoint was saved or loaded, not with what the model is.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "quantization_config",
    "use_cache",
    "_attn_implementation_autoset",
}
_FINGERPRINT_TENSORS = 3
_T = TypeVar("_T")
_FINGERPRINT_VALUES = 4096


class UnsupportedModelError(ValueError):
    """The model is not a decoder-only causal LM whose layers we can find."""


def _get_attr_path(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    paths = ([_LAYER_PATHS[model_type]] if model_type in _LAYER_PATHS else []) + list(
        _FALLBACK_LAYER_PATHS
    )
    for path in paths:
        layers = _get_attr_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise UnsupportedModelError(
        f"cannot find the decoder layers of model_type={model_type!r}; "
        f"supported families: {', '.join(sorted(_LAYER_PATHS))}"
    )


def _spread(items: list[_T]) -> list[_T]:
    """First, middle and last items: a sample that covers the whole network."""
    last = len(items) - 1
    return [items[i * last // (_FINGERPRINT_TENSORS - 1)] for i in range(_FINGERPRINT_TENSORS)]


def _checkpoint_tensor_sample(model_dir: Path) -> list[tuple[str, torch.Tensor]] | None:
    """A few tensors read from the checkpoint files, independent of the dtype served in."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    keys: list[tuple[str, Path]] = []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            keys.extend((key, file) for key in handle.keys())  # noqa: SIM118 - not a dict
    sample = []
    for key, file in _spread(sorted(keys)):
        with safe_open(str(file), framework="pt") as handle:
            sample.append((key, handle.get_tensor(key)))
    return sample


def compute_fingerprint(model: PreTrainedModel, model_dir: Path | None) -> str:
    """Hash of the config and a few weight tensors: which backbone a pack belongs to.

    Weights are read from the checkpoint files when there are any, so the same checkpoint served
    in float32 on a CPU and in bfloat16 on a GPU has the same fingerprint.
    """
    config = {
        k: v for k, v in sorted(model.config.to_dict().items()) if k not in _VOLATILE_CONFIG_KEYS
    }
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    sample = _checkpoint_tensor_sample(model_dir) if model_dir is not None else None
    if sample is None:
        sample = _spread(sorted(model.state_dict().items()))
    for _name, tensor in sample:
        values = tensor.detach().flatten()[:_FINGERPRINT_VALUES].to("cpu", torch.float32)
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(values.numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:32]


@dataclass
class Backbone:
    """A loaded causal LM with its tokenizer: the one resident model of a server."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_dir: Path | None = None
    fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        self.decoder_layers = find_decoder_layers(self.model)
        self.edit_hooks = EditHooks(self.decoder_layers)  # persistent, one per edited layer
        if self.tokenizer.pad_token_id is None:
            # Batching needs a pad id; the eos token is the usual stand-in.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not self.fingerprint:
            self.fingerprint = compute_fingerprint(self.model, self.model_dir)

    @property
    def model_type(self) -> str:
        return str(self.model.config.model_type)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def context_length(self) -> int | None:
        """Tokens a request may span: the position table, or a sliding window if smaller (the
        engine re-batches caches only while the window has dropped nothing)."""
        config = self.model.config
        limits = [getattr(config, "max_position_embeddings", None)]
        if getattr(config, "use_sliding_window", True):
            limits.append(getattr(config, "sliding_window", None))
        known = [int(v) for v in limits if isinstance(v, int) and v > 0]
        return min(known) if known else None

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def eos_token_ids(self) -> list[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(int(i) for i in source)
        return sorted(ids)

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        """The text the model sees for a chat; a plain transcript when there is no template."""
        if self.has_chat_template:
            text = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=False
            )
            return str(text)
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join([*lines, "Assistant:"])
