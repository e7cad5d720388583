"""The real default backbone: SmolLM2-135M-Instruct from the GGUF package, via the cache."""

import os
import subprocess
import sys
import time

import pytest

from server.engine.engine import BatchEngine, EngineRequest
from server.engine.sampling import SamplingParams
from server.model import Backbone
from server.model.loading import default_model_dir
from server.settings import Settings

pytestmark = pytest.mark.integration
LKS = (sys.executable, "-m", "server.cli")


def test_default_backbone_shape(default_backbone: Backbone) -> None:
    assert default_backbone.name == "SmolLM2-135M-Instruct"
    assert default_backbone.model_type == "llama"
    assert (default_backbone.num_layers, default_backbone.hidden_size) == (30, 576)
    assert default_backbone.has_chat_template
    cache = default_model_dir(Settings().cache_dir)
    assert (cache / "model.safetensors").is_file()
    assert "quantization_config" not in (cache / "config.json").read_text()


def test_knows_the_capital_of_france(default_backbone: Backbone) -> None:
    engine = BatchEngine(default_backbone)
    (result,) = engine.generate([EngineRequest("The capital of France is", SamplingParams(5))])
    assert "Paris" in result.text
    chat = default_backbone.render_chat(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    assert "<|im_start|>" in chat
    (answer,) = engine.generate([EngineRequest(chat, SamplingParams(16), templated=True)])
    assert "Paris" in answer.text


def test_cli_generate_on_a_warm_cache(default_backbone: Backbone) -> None:
    """A second process reads the converted cache: it loads the model without converting the
    GGUF again (which takes tens of seconds; a wall-clock bound alone fails on a busy host).
    A conversion writes a new directory in the cache's place: the same one must be there."""
    cache = default_model_dir(Settings().cache_dir)
    before = (cache.stat().st_ino, (cache / "model.safetensors").stat().st_mtime_ns)
    started = time.monotonic()
    result = subprocess.run(
        [*LKS, "generate", "--prompt", "The capital of France is", "--max-tokens", "5"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LKS_LOG_LEVEL": "info"},
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "loaded SmolLM2-135M-Instruct" in result.stderr, result.stderr
    after = (cache.stat().st_ino, (cache / "model.safetensors").stat().st_mtime_ns)
    assert after == before, f"converted again ({elapsed:.1f} s): {result.stderr}"
    assert elapsed < 45, f"lks generate took {elapsed:.1f} s on a warm cache"
