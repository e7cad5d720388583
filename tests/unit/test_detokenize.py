"""Incremental detokenisation and stop-string handling: the same text as decoding the whole
output again for every token (what the engine used to do), at a constant cost per token."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tiny_models import FAMILIES

from server.engine.detokenize import IncrementalDetokenizer, first_stop, stop_prefix_at_end
from server.model import Backbone, load_backbone
from server.settings import Settings


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: pytest.FixtureRequest, tiny_model_dirs: dict[str, Path]) -> Backbone:
    return load_backbone(Settings(model=tiny_model_dirs[request.param], device="cpu"))


def assert_incremental_equals_whole(backbone: Backbone, ids: list[int]) -> None:
    tokenizer = backbone.tokenizer
    detokenizer = IncrementalDetokenizer(tokenizer)
    streamed = ""
    for count, token in enumerate(ids, 1):
        streamed += detokenizer.push(token)
        whole = tokenizer.decode(ids[:count], skip_special_tokens=True)
        assert whole.rstrip("\ufffd").startswith(streamed)  # held back: an unfinished char
    streamed += detokenizer.flush()
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True)


def test_tiny_families_decode_the_same_text(tiny: Backbone) -> None:
    rng = random.Random(0)
    vocab = len(tiny.tokenizer)
    for _ in range(20):
        assert_incremental_equals_whole(tiny, [rng.randrange(vocab) for _ in range(30)])


def test_the_default_model_decodes_the_same_text(default_backbone: Backbone) -> None:
    """Byte-level BPE: spaces, newlines, and multi-byte characters split across tokens."""
    tokenizer = default_backbone.tokenizer
    text = "Hello world!\n  Ünïcödé — 東京タワー 🎉🎉 done.<|im_end|> after"
    assert_incremental_equals_whole(default_backbone, tokenizer(text).input_ids)
    rng = random.Random(1)
    for _ in range(10):
        ids = [rng.randrange(len(tokenizer)) for _ in range(40)]
        assert_incremental_equals_whole(default_backbone, ids)


def test_stop_search_and_hold_back_match_the_whole_text_rules() -> None:
    rng = random.Random(2)
    for _ in range(3000):
        text = "".join(rng.choices("ab c", k=rng.randint(0, 12)))
        stop = "".join(rng.choices("ab c", k=rng.randint(1, 5)))
        longest = next(
            (size for size in range(min(len(stop) - 1, len(text)), 0, -1)
             if text.endswith(stop[:size])),
            0,
        )  # fmt: skip
        assert stop_prefix_at_end(text, stop) == longest, (text, stop)
        new = rng.randint(1, max(1, len(text)))
        earlier = text[: len(text) - new]
        if stop not in earlier:
            assert first_stop(text, [stop], new) == text.find(stop), (text, stop, new)
