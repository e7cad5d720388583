"""What a pack's tensors and records must satisfy before it may go live.

A pack is data written by another process (or copied in by hand): a NaN block, a table whose rows
disagree, a gate whose index points past the subjects, or a hypernetwork of another shape would
load today and fail later, inside a request or a warm start. Every check here runs at load, on
the pack alone (its manifest is the reference: hidden size, subject count, dtype); the manifest
itself is checked against the backbone in `format.check_compatible`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_args

import torch

from server.editor.config import HypernetKind
from server.editor.hypernet import Hypernetwork
from server.gate.table import GateTable
from server.packs.errors import PackCorruptError

BLOCKS_KEY = "blocks"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FINITE_CHUNK = 1 << 24  # elements per isfinite pass: bounded scratch memory for big tensors


def non_finite_count(tensor: torch.Tensor) -> int:
    """NaN and infinite values in a floating tensor, counted in chunks."""
    if not tensor.is_floating_point():
        return 0
    flat = tensor.reshape(-1)
    return sum(
        int((~torch.isfinite(chunk)).sum()) for chunk in flat.split(_FINITE_CHUNK) if chunk.numel()
    )


def check_tensors_finite(ref: str, filename: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse NaN/inf anywhere, and float formats the server cannot check or compute with."""
    for key, tensor in tensors.items():
        if tensor.is_complex() or (tensor.is_floating_point() and tensor.dtype not in FLOAT_DTYPES):
            raise PackCorruptError(
                f"pack {ref}: {filename}: tensor {key!r} has unsupported dtype {tensor.dtype}"
            )
        bad = non_finite_count(tensor)
        if bad:
            raise PackCorruptError(
                f"pack {ref}: {filename}: tensor {key!r} {list(tensor.shape)} holds {bad} NaN or "
                "infinite values; the pack was trained or written badly: retrain it"
            )


def check_table(
    ref: str,
    filename: str,
    table: Mapping[str, torch.Tensor],
    *,
    subject_count: int,
    hidden_size: int,
    dtype: str,
) -> None:
    """The subject table: one block per subject of the manifest's width and dtype, and either no
    scope gate or a whole, consistent one whose rows point at those subjects."""
    where = f"pack {ref}: {filename}"
    allowed = {BLOCKS_KEY} | {f"gate.{k}" for k in GateTable.TENSOR_KEYS + GateTable.HEAD_KEYS}
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise PackCorruptError(
            f"{where}: unexpected tensors {', '.join(map(repr, unknown))} "
            f"(a format-1 table holds {BLOCKS_KEY!r} and the scope gate's 'gate.*' tensors)"
        )
    blocks = table.get(BLOCKS_KEY)
    expected = (subject_count, hidden_size)
    if blocks is None or tuple(blocks.shape) != expected:
        found = None if blocks is None else tuple(blocks.shape)
        raise PackCorruptError(
            f"{where}: '{BLOCKS_KEY}' has shape {found}, manifest says {expected} "
            "(subject_count, hidden_size)"
        )
    if not blocks.is_floating_point():
        raise PackCorruptError(
            f"{where}: '{BLOCKS_KEY}' must be floating point; got {blocks.dtype}"
        )
    found_dtype = str(blocks.dtype).removeprefix("torch.")
    if found_dtype != dtype:
        raise PackCorruptError(f"{where}: '{BLOCKS_KEY}' is {found_dtype}, manifest says {dtype}")
    try:
        GateTable.check_tensors(table, subject_count)
    except ValueError as exc:
        raise PackCorruptError(f"{where}: {exc}") from None


def check_hypernet(
    ref: str,
    filename: str,
    hypernet: Mapping[str, torch.Tensor],
    *,
    training: Mapping[str, Any],
    hidden_size: int,
) -> None:
    """A hypernetwork the training record names must have that network's exact parameters: the
    worker warm-starts the next version from it. Packs whose record names no kind (written by
    hand or by tools) are never warm-started, so only their values are checked."""
    kind = training.get("hypernet")
    if kind is None:
        return
    where = f"pack {ref}: {filename}"
    kinds = get_args(HypernetKind)
    if kind not in kinds:
        raise PackCorruptError(
            f"{where}: training.hypernet {kind!r} is not a known kind ({', '.join(kinds)})"
        )
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = {
            k: tuple(v.shape) for k, v in Hypernetwork(hidden_size, kind).state_dict().items()
        }
    found = {k: tuple(v.shape) for k, v in hypernet.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        details = [f"missing {missing}"] * bool(missing) + [f"unexpected {extra}"] * bool(extra)
        details += [f"{k} is {list(found[k])}, expected {list(expected[k])}" for k in wrong]
        raise PackCorruptError(
            f"{where}: not a {kind} hypernetwork of hidden size {hidden_size}: "
            + "; ".join(details)
        )
