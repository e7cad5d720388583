import logging
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, HIDDEN, LAYERS, build_tiny_model

from server.model import Backbone, load_backbone, load_training_backbone, loading
from server.model.backbone import compute_fingerprint
from server.model.cpu_layout import can_pack_linears, has_bfloat16_linears, has_packed_linears
from server.model.loading import cpu_has_bfloat16, resolve_dtype, training_precision
from server.settings import Settings


def _load(model_dir: Path, **settings: object) -> Backbone:
    return load_backbone(Settings(model=model_dir, device="cpu", **settings))


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_exposes_layers_and_sizes(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    backbone = _load(tiny_model_dirs[family])
    assert backbone.model_type == family
    assert backbone.num_layers == LAYERS
    assert backbone.hidden_size == HIDDEN
    # the layers found are the ones the model runs: a hook on the last one sees its output
    seen: list[torch.Size] = []
    handle = backbone.decoder_layers[-1].register_forward_hook(
        lambda _m, _i, out: seen.append((out[0] if isinstance(out, tuple) else out).shape)
    )
    try:
        backbone.model(input_ids=torch.tensor([[3, 4, 5]]))
    finally:
        handle.remove()
    assert seen == [torch.Size([1, 3, HIDDEN])]
    assert backbone.tokenizer.pad_token_id is not None
    assert backbone.eos_token_ids == [2]


@pytest.mark.parametrize("family", FAMILIES)
def test_fingerprint_is_stable_and_dtype_independent(
    family: str, tiny_model_dirs: dict[str, Path]
) -> None:
    first = _load(tiny_model_dirs[family])
    again = _load(tiny_model_dirs[family])
    in_bf16 = _load(tiny_model_dirs[family], dtype="bfloat16")
    assert first.fingerprint.startswith("sha256:")
    assert first.fingerprint == again.fingerprint == in_bf16.fingerprint


def test_training_runs_on_a_float32_copy_of_a_backbone_served_in_another_dtype(
    tiny_model_dirs: dict[str, Path],
) -> None:
    settings = Settings(model=tiny_model_dirs["llama"], device="cpu", dtype="bfloat16")
    served = load_backbone(settings)
    training = load_training_backbone(settings, served)
    assert served.dtype == torch.bfloat16 and training.dtype == torch.float32
    assert training.model is not served.model and training.fingerprint == served.fingerprint
    # `auto` multiplies in bfloat16 where the CPU has the instructions, whatever it serves in
    assert has_bfloat16_linears(training.model) == cpu_has_bfloat16()
    in_float32 = _load(tiny_model_dirs["llama"], dtype="float32")
    auto = load_training_backbone(Settings(), in_float32)
    assert (auto is in_float32) == (not cpu_has_bfloat16())
    assert has_bfloat16_linears(auto.model) == cpu_has_bfloat16()
    # the same model in float32 is its own float32 copy; `serving` trains on the served one
    assert load_training_backbone(Settings(train_dtype="float32"), in_float32) is in_float32
    mixed = settings.model_copy(update={"train_dtype": "mixed"})
    assert has_bfloat16_linears(load_training_backbone(mixed, in_float32).model)
    on_served = settings.model_copy(update={"train_dtype": "serving"})
    trained_on = load_backbone(on_served)
    assert load_training_backbone(on_served, trained_on) is trained_on
    # packed linears (no autograd) only where training runs on the copy
    assert not has_packed_linears(trained_on.model) and not has_packed_linears(training.model)
    assert has_packed_linears(served.model) == can_pack_linears(torch.bfloat16)
    # the copy is of the weights served, whatever model the settings name now
    elsewhere = settings.model_copy(update={"model": tiny_model_dirs["qwen2"]})
    assert load_training_backbone(elsewhere, served).fingerprint == served.fingerprint


@pytest.mark.parametrize("has_bfloat16", [True, False])
def test_what_training_runs_in_by_device_and_cpu(
    has_bfloat16: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auto`: bfloat16 products on a CPU that has the instructions, float32 on one without
    (emulated bfloat16 is slower), the served weights on a GPU; a float32 backbone is its own
    float32 copy, and `mixed` is a copy whatever the backbone serves in."""
    monkeypatch.setattr(loading, "cpu_has_bfloat16", lambda: has_bfloat16)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    auto, mixed = Settings(), Settings(train_dtype="mixed")
    float32, serving = Settings(train_dtype="float32"), Settings(train_dtype="serving")
    on_cpu = "mixed" if has_bfloat16 else "float32"
    assert training_precision(auto, cpu, torch.bfloat16) == on_cpu
    assert training_precision(auto, cpu, torch.float32) == ("mixed" if has_bfloat16 else "serving")
    assert training_precision(auto, gpu, torch.bfloat16) == "serving"
    assert training_precision(mixed, gpu, torch.bfloat16) == "mixed"
    assert training_precision(mixed, cpu, torch.float32) == "mixed"
    assert training_precision(float32, cpu, torch.float32) == "serving"
    assert training_precision(float32, gpu, torch.float16) == "float32"
    assert training_precision(serving, cpu, torch.bfloat16) == "serving"


def test_mixed_training_on_a_cpu_without_bfloat16_says_it_is_slower(
    tiny_model_dirs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(loading, "cpu_has_bfloat16", lambda: False)
    settings = Settings(model=tiny_model_dirs["llama"], device="cpu", train_dtype="mixed")
    served = _load(tiny_model_dirs["llama"], dtype="float32")
    with caplog.at_level(logging.WARNING, logger="server.model.loading"):
        training = load_training_backbone(settings, served)
    assert has_bfloat16_linears(training.model)
    assert "emulated, slower than float32" in caplog.text


def test_fingerprint_tells_models_apart(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    fingerprints = {_load(d).fingerprint for d in tiny_model_dirs.values()}
    assert len(fingerprints) == len(FAMILIES)
    reseeded = _load(build_tiny_model("llama", tmp_path / "llama", seed=1))
    assert reseeded.fingerprint != _load(tiny_model_dirs["llama"]).fingerprint


def test_fingerprint_without_checkpoint_files_uses_loaded_weights(
    tiny_model_dirs: dict[str, Path],
) -> None:
    backbone = _load(tiny_model_dirs["qwen2"])
    in_memory = compute_fingerprint(backbone.model, None)
    assert in_memory.startswith("sha256:")
    with torch.no_grad():
        for parameter in backbone.model.parameters():
            parameter.add_(1e-3)
    assert compute_fingerprint(backbone.model, None) != in_memory


def test_render_chat_uses_the_template_or_a_plain_transcript(
    tiny_model_dirs: dict[str, Path],
) -> None:
    messages = [{"role": "user", "content": "who was born in paris ?"}]
    with_template = _load(tiny_model_dirs["llama"])
    assert with_template.has_chat_template
    assert (
        with_template.render_chat(messages) == "user : who was born in paris ? <eos> assistant : "
    )
    without = _load(tiny_model_dirs["gpt2"])
    assert not without.has_chat_template
    assert without.render_chat(messages) == "User: who was born in paris ?\nAssistant:"


def test_unknown_directory_fails_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "no-such-family"}')
    with pytest.raises(Exception, match=r"no-such-family|cannot load"):
        _load(tmp_path)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU flags from Linux")
def test_auto_serves_bfloat16_exactly_on_a_cpu_with_bfloat16_instructions() -> None:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    native = bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
    assert cpu_has_bfloat16() == native
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert resolve_dtype("float32", cpu) == torch.float32
