"""Column-major linears: same outputs as the stock model, no extra memory, ties kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES
from torch import nn
from transformers import AutoModelForCausalLM

from server.model.cpu_layout import ColumnMajorLinear, use_column_major_linears


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_unchanged_and_ties_kept(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    stock = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family]).eval()
    fast = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family]).eval()
    linears = sum(type(m) is nn.Linear for m in fast.modules())
    assert use_column_major_linears(fast) == linears > 0
    assert not any(type(m) is nn.Linear for m in fast.modules())
    ids = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    with torch.inference_mode():
        assert torch.allclose(stock(ids).logits, fast(ids).logits, atol=1e-5)
    head, embed = fast.get_output_embeddings(), fast.get_input_embeddings()
    if stock.get_output_embeddings().weight is stock.get_input_embeddings().weight:
        assert head.weight is embed.weight, "tied weights must stay tied"
    assert isinstance(head, ColumnMajorLinear)
    assert head.weight.data_ptr() == head.weight_t.data_ptr(), "the weight is a view, no copy"
