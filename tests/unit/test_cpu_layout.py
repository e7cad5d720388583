"""CPU linear layouts: column-major (float32) and oneDNN-packed (bfloat16) give the stock
model's outputs; column-major costs no extra memory and keeps ties."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from server.model.cpu_layout import (
    BFloat16Linear,
    ColumnMajorLinear,
    PackedLinear,
    can_pack_linears,
    has_bfloat16_linears,
    linear_weight,
    use_bfloat16_linears,
    use_column_major_linears,
    use_packed_linears,
)

needs_packing = pytest.mark.skipif(
    not can_pack_linears(torch.bfloat16), reason="this CPU has no oneDNN bfloat16 matmul"
)


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


@needs_packing
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_linears_give_the_stock_logits_in_bfloat16(
    family: str, tiny_model_dirs: dict[str, Path]
) -> None:
    """Bit for bit, at a decode step's row counts and a prefill's; a tied head gets its own
    packed copy and the input embedding keeps its weight."""
    load = AutoModelForCausalLM.from_pretrained
    stock = load(tiny_model_dirs[family], dtype=torch.bfloat16).eval()
    packed = load(tiny_model_dirs[family], dtype=torch.bfloat16).eval()
    linears = sum(type(m) is nn.Linear for m in packed.modules())
    assert use_packed_linears(packed) == linears > 0
    assert not any(type(m) is nn.Linear for m in packed.modules())
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows, length in ((1, 1), (16, 1), (2, 40)):
            ids = torch.randint(3, stock.config.vocab_size, (rows, length), generator=generator)
            assert torch.equal(stock(ids).logits, packed(ids).logits)
    assert isinstance(packed.get_output_embeddings(), PackedLinear)
    embedding = packed.get_input_embeddings().weight
    assert torch.equal(embedding, stock.get_input_embeddings().weight)


def test_linear_weight_is_the_map_s_weight_in_either_layout_and_none_otherwise() -> None:
    """What lets training take a head's input gradient as one product (head_loss.py)."""

    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    linear = nn.Linear(4, 6)
    column_major = ColumnMajorLinear.from_linear(linear)
    x = torch.randn(3, 4)
    for module in (linear, column_major):
        weight = linear_weight(module)
        assert weight is not None
        torch.testing.assert_close(module(x), x @ weight.T + linear.bias)
    in_bfloat16 = BFloat16Linear(linear.requires_grad_(False))
    weight = linear_weight(in_bfloat16)
    assert weight is not None and weight.dtype == torch.bfloat16
    expected = (x.bfloat16() @ weight.T).float() + linear.bias
    torch.testing.assert_close(in_bfloat16(x), expected)
    assert linear_weight(Scaled(4, 6)) is None
    assert linear_weight(nn.Sequential(linear)) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_linears_multiply_in_bfloat16_between_float32_states(
    family: str, tiny_model_dirs: dict[str, Path]
) -> None:
    """Training's `mixed` copy: each linear's product in bfloat16 (its input rounded, its
    weight kept so), the states and the gradients that flow between layers float32; a tied
    head gets a bfloat16 copy and the input embedding keeps its float32 weight."""
    load = AutoModelForCausalLM.from_pretrained
    stock = load(tiny_model_dirs[family]).eval().requires_grad_(False)
    mixed = load(tiny_model_dirs[family]).eval().requires_grad_(False)
    use_column_major_linears(mixed)  # as a CPU loads it first
    maps = (nn.Linear, ColumnMajorLinear, Conv1D)  # GPT-2's attention and MLP are Conv1D
    linears = sum(type(m) in maps for m in mixed.modules())
    assert use_bfloat16_linears(mixed) == linears > 0 and has_bfloat16_linears(mixed)
    assert not has_bfloat16_linears(stock)
    assert not any(type(m) in maps for m in mixed.modules())
    embedding = mixed.get_input_embeddings().weight
    assert embedding.dtype == torch.float32
    assert torch.equal(embedding, stock.get_input_embeddings().weight)
    assert mixed.get_output_embeddings().weight.dtype == torch.bfloat16

    ids = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    embeds = stock.get_input_embeddings()(ids).requires_grad_()
    out = mixed(inputs_embeds=embeds, output_hidden_states=True)
    assert all(h.dtype == torch.float32 for h in out.hidden_states)
    assert out.logits.dtype == torch.float32
    expected = stock(inputs_embeds=embeds).logits
    torch.testing.assert_close(out.logits, expected, atol=0.05, rtol=0.05)
    assert not torch.equal(out.logits, expected), "the products are not float32's"
    (gradient,) = torch.autograd.grad(out.logits.square().sum(), embeds)
    assert gradient.dtype == torch.float32 and gradient.abs().sum() > 0

    with pytest.raises(ValueError, match="trainable"):
        use_bfloat16_linears(nn.Sequential(nn.Linear(4, 4)))
    conv = Conv1D(6, 4).requires_grad_(False)  # [in, out] weight: the same map as nn.Linear's
    x = torch.randn(3, 4)
    expected = (x.bfloat16() @ conv.weight.bfloat16()).float() + conv.bias
    torch.testing.assert_close(BFloat16Linear(conv)(x), expected)
