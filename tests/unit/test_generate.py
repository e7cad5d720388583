from pathlib import Path

import pytest

from server.engine.generate import Generator, SamplingParams
from server.model import load_backbone
from server.settings import Settings


@pytest.fixture(scope="module")
def generator(tiny_model_dirs: dict[str, Path]) -> Generator:
    return Generator(load_backbone(Settings(model=tiny_model_dirs["llama"], device="cpu")))


def test_greedy_is_deterministic_and_respects_max_tokens(generator: Generator) -> None:
    params = SamplingParams(max_tokens=6)
    first = generator.generate("the capital of france is", params)
    second = generator.generate("the capital of france is", params)
    assert first == second
    assert first.prompt_tokens == 5
    assert 1 <= first.tokens <= 6
    assert first.finish_reason == ("length" if first.tokens == 6 else "stop")


def test_seeded_sampling_repeats(generator: Generator) -> None:
    params = SamplingParams(max_tokens=8, temperature=1.5, seed=7)
    assert generator.generate("who was", params) == generator.generate("who was", params)


def test_chat_prompt_uses_the_template(generator: Generator) -> None:
    text = generator.prompt_text("who was born in paris ?", chat=True)
    assert text.startswith("user : who was born in paris ?")
    result = generator.generate(text, SamplingParams(max_tokens=3), templated=True)
    assert result.prompt_tokens == len(text.split())


@pytest.mark.parametrize(
    "params", [{"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}]
)
def test_sampling_params_reject_nonsense(params: dict[str, float]) -> None:
    with pytest.raises(AssertionError):
        SamplingParams(**params)  # type: ignore[arg-type]
