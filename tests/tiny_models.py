"""Tiny random causal LMs of each supported family, built locally (no downloads).

The tokenizer is a word-level one over a small vocabulary, so tests can reason about tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
WORDS = (  # noqa: SIM905 - a sentence reads better than a list literal here
    "the capital of france is paris germany berlin italy rome a an and in on who what where "
    "was born language speaks mother tongue city river football plays for team color red blue "
    "green danielle darrieux english french user assistant . , ? !"
).split()
SPECIALS = ["<unk>", "<pad>", "<eos>"]
HIDDEN = 32
LAYERS = 4
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def build_tokenizer(*, chat_template: bool) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + list(dict.fromkeys(WORDS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(family: str, vocab_size: int) -> PretrainedConfig:
    common = {"vocab_size": vocab_size, "eos_token_id": 2, "pad_token_id": 1, "bos_token_id": 2}
    if family == "gpt2":
        return GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=128, **common)
    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    return config_class(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **common,
    )


def build_tiny_model(family: str, directory: Path, *, seed: int = 0) -> Path:
    """Save a tiny random `family` model with its tokenizer to `directory`."""
    tokenizer = build_tokenizer(chat_template=family != "gpt2")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
