"""CPU weight layouts for the linear layers: what makes a decode step's matrix products fast.

Float32: MKL's GEMM on `x @ W.T` with a row-major `W` (what `nn.Linear` does) is slow for the
small row counts of batched decoding: on the default model, 16 rows x a 1536x576 projection take
about 1 ms; with the weight stored transposed and contiguous, `x @ W_t` takes 0.25 ms (and batch
1 is no slower). `ColumnMajorLinear` stores it so, as a view: no extra memory.

Bfloat16 (CPUs with AVX-512 BF16 or AMX): oneDNN's matmul reads a plain row- or column-major
bfloat16 weight well below the memory bandwidth at these row counts; reordered once into
oneDNN's blocked layout (`PackedLinear`) it reads it markedly faster, with bit-identical outputs
(docs/results/serving.md, "Packed bfloat16 weights"). A packed weight is opaque: no autograd and
no `torch.compile`, so only a backbone that is never trained on (training runs on a float32
copy) is packed, and its decode step runs eager.

Training on such a CPU (`BFloat16Linear`): the float32 copy training runs on keeps its states
in float32 but multiplies in bfloat16, its linear maps' weights kept in bfloat16 (autograd
works, unlike a packed weight's).

On CUDA cuBLAS needs neither layout; these apply on the CPU only.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class ColumnMajorLinear(nn.Linear):
    """`nn.Linear` whose weight lives transposed: `weight` is a view of `weight_t` [in, out]."""

    weight_t: torch.Tensor

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> ColumnMajorLinear:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        weight_t = linear.weight.detach().t().contiguous()
        module.register_buffer("weight_t", weight_t, persistent=False)
        module.weight = nn.Parameter(weight_t.t(), requires_grad=linear.weight.requires_grad)
        module.bias = linear.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


class BFloat16Linear(nn.Module):
    """A frozen linear map that multiplies in bfloat16 inside a float32 model: its [out, in]
    weight is kept in bfloat16, the input is rounded to bfloat16 for the product alone, and the
    product comes back in the input's dtype (float32 here; a bias stays float32), so the states
    between layers, the norms and attention's softmax stay float32. On a CPU with bfloat16
    instructions oneDNN's products run about three times as fast as float32's; training's copy
    of the backbone uses it there."""

    weight: nn.Parameter

    def __init__(self, module: nn.Linear | Conv1D) -> None:
        """From an `nn.Linear` (or `ColumnMajorLinear`), or from GPT-2's `Conv1D`, whose weight
        is stored [in, out]."""
        super().__init__()
        weight = module.weight.detach()
        if isinstance(module, Conv1D):
            weight = weight.t()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.to(torch.bfloat16).contiguous(), requires_grad=False)
        self.bias = module.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


def linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The [out, in] weight of a module that computes `x @ weight.T (+ bias)` whatever its
    layout (`nn.Linear`, `ColumnMajorLinear`) or the dtype it multiplies in (`BFloat16Linear`:
    the product in the weight's dtype); None for any other module (a subclass with a forward of
    its own, a packed weight)."""
    if type(module).forward in (
        nn.Linear.forward,
        ColumnMajorLinear.forward,
        BFloat16Linear.forward,
    ):
        return module.weight  # type: ignore[return-value]
    return None


def _children_of_types(
    model: nn.Module, *types: type[nn.Module]
) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, child) for every submodule of `model` whose exact type is one of `types`
    (a subclass with a forward of its own is left alone), listed before any is swapped."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) in types
    ]


def use_bfloat16_linears(model: nn.Module) -> int:
    """Swap every linear map of a frozen float32 `model` (`nn.Linear`, `ColumnMajorLinear`,
    GPT-2's `Conv1D`) for a `BFloat16Linear` (in place); an output head tied to the input
    embedding gets a bfloat16 copy, the embedding keeps its float32 weight. Returns how many."""
    swaps = _children_of_types(model, nn.Linear, ColumnMajorLinear, Conv1D)
    for parent, name, child in swaps:
        if any(p.requires_grad for p in child.parameters()):
            raise ValueError(f"{name} is trainable: only a frozen model multiplies in bfloat16")
        setattr(parent, name, BFloat16Linear(child))
    return len(swaps)


def has_bfloat16_linears(model: nn.Module) -> bool:
    return any(isinstance(module, BFloat16Linear) for module in model.modules())


def use_column_major_linears(model: nn.Module) -> int:
    """Swap every `nn.Linear` of `model` for a `ColumnMajorLinear` (in place, no extra memory);
    modules that shared a weight (tied embeddings) share the new one. Returns how many."""
    replaced: dict[int, nn.Parameter] = {}
    swaps = _children_of_types(model, nn.Linear)
    for parent, name, child in swaps:
        new = ColumnMajorLinear.from_linear(child)
        replaced[id(child.weight)] = new.weight
        setattr(parent, name, new)
    for module in model.modules():  # re-tie: e.g. the input embedding shares the output head
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and id(weight) in replaced:
            module.weight = replaced[id(weight)]
    return len(swaps)


class PackedLinear(nn.Module):
    """An inference-only linear layer whose weight oneDNN has reordered into its blocked layout
    (`packed`, opaque); the row-major weight is not kept."""

    packed: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().contiguous()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.register_buffer("packed", packed, persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_pack_linears(dtype: torch.dtype) -> bool:
    """Whether this CPU runs oneDNN's packed matmul in `dtype` (bfloat16 with the instructions)."""
    return (
        dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def use_packed_linears(model: nn.Module) -> int:
    """Swap every `nn.Linear` of `model` for a `PackedLinear` (in place); an output head tied to
    the input embedding gets a packed copy, the embedding keeps its weight. Returns how many."""
    swaps = _children_of_types(model, nn.Linear)
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child))
    return len(swaps)


def has_packed_linears(model: nn.Module) -> bool:
    return any(isinstance(module, PackedLinear) for module in model.modules())
