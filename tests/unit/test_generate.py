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


def test_edit_sets_change_only_prompts_that_name_their_subjects(generator: Generator) -> None:
    import torch

    from server.lks.apply import EditSet
    from server.packs.format import SubjectEntry

    hidden = generator.backbone.hidden_size
    delta = torch.randn(1, hidden, generator=torch.Generator().manual_seed(3)) * 50
    edits = EditSet([SubjectEntry("france")], delta, layer=1, ref="demo@1")
    params = SamplingParams(max_tokens=4)
    named = "the capital of france is"
    plain = generator.generate(named, params)
    edited = generator.generate(named, params, edit_sets=[edits])
    assert edited.edits_applied == ["demo@1:france"]
    assert edited.token_ids != plain.token_ids
    other = "who was born in rome"
    untouched = generator.generate(other, params, edit_sets=[edits])
    assert untouched.edits_applied == []
    assert untouched == generator.generate(other, params)


def test_batched_evaluation_generations_keep_rows_apart(generator: Generator) -> None:
    """Left-padded batch generation: the edit reaches its row only, the other row is unchanged."""
    import torch

    from server.lks.apply import EditSet
    from server.lks.evaluate import greedy_generations
    from server.packs.format import SubjectEntry

    backbone = generator.backbone
    delta = torch.randn(1, backbone.hidden_size, generator=torch.Generator().manual_seed(5)) * 50
    edits = EditSet([SubjectEntry("france")], delta, layer=1)
    prompts = ["the capital of france", "who was born in the city of rome"]
    edited = greedy_generations(backbone, prompts, edits, max_new_tokens=4)
    plain = greedy_generations(backbone, prompts, None, max_new_tokens=4)
    alone = greedy_generations(backbone, prompts[:1], edits, max_new_tokens=4)
    assert edited[1] == plain[1]
    assert edited[0] == alone[0]
    assert edited[0] != plain[0]
