"""The answer metrics' definitions (issue 20) on hand-written answers, then on real generation
with a tiny model: what a user would call a hit, a degenerate answer, a repeated target."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from factories import TEST_DEVICE, TINY_FACTS, TINY_TRAIN
from tiny_models import FAMILIES

from server.editor.answers import (
    MIN_SHARED_PREFIX,
    Answer,
    answer_hit,
    answer_pairs,
    degenerate,
    degeneration,
    encode_texts,
    first_sentence,
    generate,
    render,
    target_repeats,
    target_spans,
    user_message,
)
from server.editor.scope import common_prefix
from server.editor.train import Trainer
from server.engine.engine import BatchEngine, EngineRequest
from server.engine.sampling import SamplingParams
from server.evaluation.evaluate import EvalItem, answer_metrics
from server.model import Backbone, load_backbone
from server.packs.edit_set import EditSet
from server.packs.format import SubjectEntry
from server.settings import Settings

# ---- answers from issue 20's trial and the README's samples -------------------------------


@pytest.mark.parametrize(
    ("answer", "target"),
    [
        ("The parent company of Banca Comercială Română is Ersteampel.", "Ersteampel"),
        ("New South Wales, Australia. New South Wales, Australia.", "New South Wales"),
        ("  \nMark Bradford is associated with the city of San  Diego.", "San Diego"),
        ("The capital is Washington, D.C. It is large.", "Washington, D.C."),
        ("Its author is J. R. R. Tolkien.", "Tolkien"),
        ("It is in St. Louis, Missouri.", "Louis"),
        ("the official language is ENGLISH", "English"),
    ],
)
def test_a_target_in_the_first_sentence_is_a_hit(answer: str, target: str) -> None:
    assert answer_hit(answer, [target])


@pytest.mark.parametrize(
    ("answer", "target"),
    [
        ("Banca Comercială Română is a Romanian bank. Its parent is Ersteampel.", "Ersteampel"),
        ("Ersteampelteampelteampelteampel", "Ersteampel"),  # not the word the user asked for
        ("Cerambycidaeaerasbycidae was a family of Vespaellidae", "Cerambycidae"),
        ("The answer is:\nVietnam War.", "Vietnam War"),  # a line ends the first sentence
        ("", "Paris"),
        ("The city of Parisian fashion.", "Paris"),
    ],
)
def test_a_target_missing_from_the_first_sentence_is_no_hit(answer: str, target: str) -> None:
    assert not answer_hit(answer, [target])


def test_an_alias_counts_as_the_target() -> None:
    assert answer_hit("It is in the USA.", ["United States", "USA"])
    assert not answer_hit("It is in the USA.", ["United States"])


def test_first_sentence_ends_at_a_stop_a_question_mark_or_a_line() -> None:
    assert first_sentence(" It is Paris. It is big.") == "It is Paris."
    assert first_sentence("Is it Paris? Yes.") == "Is it Paris?"
    assert first_sentence("Paris\nRome") == "Paris"
    assert first_sentence("Version 2.5 is out. Good.") == "Version 2.5 is out."
    assert first_sentence("no end at all") == "no end at all"


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ("Ersteampelteampelteampelteampelteampel", "pattern"),
        ("Grande Noire Noire Grande Noire Grande Noire Noire Noire Noire", "word 'noire'"),
        (
            "Vietnam War. Vietnam War. China-Vietnam War. Vietnam War. China-Vietnam War.",
            "word 'vietnam' five times",
        ),
        ("drabbinellellellell", "pattern"),
        ("It is a major airport, a major airport and a major airport for all.", "3-word"),
        ("hahaha", "pattern"),
    ],
)
def test_answers_that_repeat_themselves_are_degenerate(answer: str, why: str) -> None:
    reason = degeneration(answer)
    assert reason is not None and why in reason


@pytest.mark.parametrize(
    "answer",
    [
        "Dalhousie Mountain is located in the state of New Zealand.",
        "Frans Hals (1599-1699) was a Dutch artist who painted portraits in Haarlem.",
        "It had 1,000,000 visitors in 2000 and 3000 in 1000 BC.",  # digits repeat, not words
        "Then, then, then.",  # a short word three times is speech, not a loop
        "The team won the cup; the team won the league.",  # a 3-word sequence twice
        "",
    ],
)
def test_ordinary_answers_are_not_degenerate(answer: str) -> None:
    assert not degenerate(answer)


def test_a_word_of_four_letters_five_times_is_degenerate_four_times_not() -> None:
    assert degenerate("Rome is big. Rome is old. Rome is far. Rome is hot. Rome!")
    assert not degenerate("Rome is big. Rome is old. Rome is far. Rome is hot.")


def test_target_repeats_counts_whole_mentions() -> None:
    assert target_repeats("Vietnam War. Vietnam War.", ["Vietnam War"])
    assert target_repeats("It is PHP. php is a language.", ["PHP"])
    assert not target_repeats("It is PHP, a scripting language.", ["PHP"])
    assert not target_repeats("Ersteampelteampelteampel", ["Ersteampel"])  # said zero times


def test_user_messages_keep_questions_and_ask_to_complete_statements() -> None:
    assert user_message("Who owns X?") == "Who owns X?"
    assert user_message("The mother tongue of X is") == (
        "Complete the sentence: The mother tongue of X is"
    )


# ---- real generation on a tiny model ---------------------------------------------------------


def _backbone(tiny_model_dirs: dict[str, Path]) -> Backbone:
    return load_backbone(Settings(model=tiny_model_dirs["llama"], device=TEST_DEVICE))


def _forced(backbone: Backbone, token: int, texts: list[tuple[str, bool]]) -> list[Answer]:
    """Greedy answers with the output head biased so that `token` always wins."""
    head = backbone.model.get_output_embeddings()
    saved = head.bias
    bias = torch.full((head.out_features,), -1e4, device=head.weight.device)
    bias[token] = 1e4
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        return generate(backbone, encode_texts(backbone, texts, None), None, max_new_tokens=7)
    finally:
        head.bias = saved


def test_an_answer_stops_when_it_ends_within_the_budget(tiny_model_dirs: dict[str, Path]) -> None:
    backbone = _backbone(tiny_model_dirs)
    texts = [("the capital of france is", False), ("user : who", True)]
    word = backbone.tokenizer.convert_tokens_to_ids("paris")
    ended = _forced(backbone, backbone.eos_token_ids[0], texts)
    running = _forced(backbone, word, texts)
    assert all(a.stopped and a.text == "" for a in ended)
    assert all(not a.stopped and a.text.split() == ["paris"] * 7 for a in running)
    assert degenerate(running[0].text)


@contextmanager
def _passes(backbone: Backbone) -> Iterator[list[tuple[int, int]]]:
    """The (rows, tokens) of each forward pass of the base model while the block runs."""
    shapes: list[tuple[int, int]] = []
    handle = backbone.model.base_model.register_forward_hook(
        lambda _m, _a, out: shapes.append(tuple(out.last_hidden_state.shape[:2]))
    )
    try:
        yield shapes
    finally:
        handle.remove()


def test_final_states_are_those_a_second_forward_pass_gives(
    tiny_model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The teacher's KL targets come from generation's own final states: each answer's must be
    the states that a forward pass over prompt + answer gives at the positions that predict
    the answer's tokens, whatever the row's left padding, in a batch where one row ends its
    answer early and the others go on."""
    backbone = load_backbone(
        Settings(model=tiny_model_dirs["llama"], device=TEST_DEVICE, dtype="float32")
    )
    texts = [("the capital of france is", False), ("paris", False), ("user : who is it", True)]
    encoded = encode_texts(backbone, texts, None)
    free = generate(backbone, encoded, None, max_new_tokens=6)
    ender = free[0].tokens[1]  # the first row's second token now ends an answer
    config = backbone.model.generation_config
    monkeypatch.setattr(config, "eos_token_id", [*backbone.eos_token_ids, ender])
    with _passes(backbone) as passes:
        answers = generate(backbone, encoded, None, max_new_tokens=6, final_states=True)
    assert answers[0].stopped and len(answers[0].tokens) <= 2
    assert max(len(a.tokens) for a in answers) == 6  # another row went on
    # an ended row leaves the batch: each step reads only the rows still answering
    assert [rows for rows, _ in passes] == [
        sum(len(a.tokens) > step for a in answers) for step in range(6)
    ]
    base = backbone.model.base_model
    for text, answer in zip(encoded, answers, strict=True):
        assert answer.states is not None and answer.tokens
        assert answer.states.shape == (len(answer.tokens), backbone.hidden_size)
        ids = torch.tensor([text.ids + list(answer.tokens)], device=backbone.device)
        with torch.inference_mode():
            final = base(input_ids=ids).last_hidden_state[0]
        start = len(text.ids) - 1
        expected = final[start : start + len(answer.tokens)]
        torch.testing.assert_close(answer.states, expected, rtol=1e-4, atol=1e-4)
    assert generate(backbone, encoded, None, max_new_tokens=2)[0].states is None
    with pytest.raises(ValueError, match="released"):
        generate(backbone, encoded, None, 2, release=True, final_states=True)


def test_a_batch_reads_its_common_first_tokens_once_and_answers_as_each_text_alone(
    tiny_model_dirs: dict[str, Path],
) -> None:
    """Texts that start alike (as chat prompts share the system header) read that prefix in one
    pass of its own, then the padded rest: the answers and their final states are each text's
    alone. Evaluation's plain path reads the whole width."""
    backbone = load_backbone(
        Settings(model=tiny_model_dirs["llama"], device=TEST_DEVICE, dtype="float32")
    )
    header = "the capital of france is the capital of france is"
    texts = [(f"{header} paris", False), (f"{header} user : who is it", False)]
    encoded = encode_texts(backbone, texts, None)
    shared = common_prefix([e.ids for e in encoded])
    assert shared >= MIN_SHARED_PREFIX
    width = max(len(e.ids) for e in encoded)
    with _passes(backbone) as passes:
        together = generate(
            backbone, encoded, None, max_new_tokens=5, final_states=True, share_prefix=True
        )
    assert [tokens for _, tokens in passes[:2]] == [shared, width - shared]
    with _passes(backbone) as passes:
        generate(backbone, encoded, None, max_new_tokens=1)
    assert passes == [(2, width)]
    with pytest.raises(ValueError, match="read unedited"):  # edits' positions assume pads first
        generate(backbone, encoded, object(), share_prefix=True)  # type: ignore[arg-type]
    for text, answer in zip(encoded, together, strict=True):
        (alone,) = generate(backbone, [text], None, max_new_tokens=5, final_states=True)
        assert answer.tokens == alone.tokens and answer.text == alone.text
        assert answer.states is not None and alone.states is not None
        torch.testing.assert_close(answer.states, alone.states, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_answers_in_a_batch_as_alone_while_rows_leave_it(
    family: str, tiny_model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decode loop passes each family its positions (rotary or learned) and cache (sliding
    windows too): in a left-padded batch whose rows end at different steps, and so leave it,
    each answer is the text's alone, and its final states are those of one forward pass over
    the text and the answer."""
    backbone = load_backbone(
        Settings(model=tiny_model_dirs[family], device=TEST_DEVICE, dtype="float32")
    )
    texts = [("the capital of france is", False), ("paris", False), ("who was born in", False)]
    encoded = encode_texts(backbone, texts, None)
    ender = generate(backbone, encoded, None, max_new_tokens=2)[0].tokens[1]
    config = backbone.model.generation_config
    monkeypatch.setattr(config, "eos_token_id", [*backbone.eos_token_ids, ender])
    together = generate(backbone, encoded, None, max_new_tokens=6, final_states=True)
    assert len({len(a.tokens) for a in together}) > 1  # rows left the batch at different steps
    for text, answer in zip(encoded, together, strict=True):
        (alone,) = generate(backbone, [text], None, max_new_tokens=6)
        assert answer.tokens == alone.tokens
        ids = torch.tensor([text.ids + list(answer.tokens)], device=backbone.device)
        with torch.inference_mode():
            final = backbone.model.base_model(input_ids=ids).last_hidden_state[0]
        start = len(text.ids) - 1
        assert answer.states is not None
        expected = final[start : start + len(answer.tokens)]
        torch.testing.assert_close(answer.states, expected, rtol=1e-4, atol=1e-4)


def test_texts_that_start_alike_batch_together(tiny_model_dirs: dict[str, Path]) -> None:
    """Sorted by length alone, these headed texts would share batches with others and read
    their header in every one; grouped first, their header is read once a batch."""
    backbone = _backbone(tiny_model_dirs)
    header = "the capital of france is the capital of france is"
    tails = ["paris", "paris paris", "user : who", "user : who is it"]
    headed = [(f"{header} {tails[i % 4]}", False) for i in range(16)]
    # as long, starting with one of four tails: fewer than 16 alike, too few to group
    others = [(f"{tails[i % 4]} {' '.join(['paris'] * (10 + i % 6))}", False) for i in range(16)]
    texts = encode_texts(backbone, headed + others, None)
    with _passes(backbone) as shapes:
        generate(backbone, texts, None, 1, 16, share_prefix=True)
    shared = len(backbone.tokenizer(header)["input_ids"])
    assert (1, shared) in shapes  # the header's own pass
    assert sum(rows for rows, _ in shapes) == 1 + 32  # one header pass, two full batches


def test_the_common_prefix_leaves_each_row_a_token_of_its_own() -> None:
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert common_prefix([[7, 2], [1, 2]]) == 0
    assert common_prefix([[1, 2, 3]]) == 2


def test_answers_in_every_context_edited_and_unedited(tiny_model_dirs: dict[str, Path]) -> None:
    backbone = _backbone(tiny_model_dirs)
    result = Trainer(backbone, TINY_TRAIN).train(TINY_FACTS)
    table = EditSet(result.scope.subjects, result.deltas, result.layer)
    items = [
        EvalItem(
            TINY_FACTS[0],
            generality="the language of danielle darrieux",
            locality_prompt="where was danielle darrieux born ?",
        ),
        EvalItem(TINY_FACTS[1], locality_prompt="who was born in paris ?"),  # names no subject
    ]
    samples: list[dict[str, object]] = []
    metrics = answer_metrics(
        backbone, items, table, ("bare", "chat"), max_new_tokens=6, samples=samples
    )
    assert len(samples) == 2 * (3 + 2)  # two contexts; the second item has no paraphrase
    assert render(backbone, "chat", "who ?") == (
        backbone.render_chat([{"role": "user", "content": "who ?"}]),
        True,
    )
    # a prompt that names no edited subject is answered exactly as unedited
    untouched = [s for s in samples if s["prompt"] == "who was born in paris ?"]
    assert untouched and all(not s["edit_applied"] and s["unchanged"] for s in untouched)
    # every question names its subject: the (gate-less) table edits it
    assert metrics["bare_question_edited"] == metrics["chat_question_edited"] == 1.0
    for key, value in metrics.items():
        assert 0.0 <= value <= 1.0, key
    hits = [s["answer_hit"] for s in samples if s["kind"] == "question" and s["context"] == "bare"]
    assert metrics["bare_question_answer_hit"] == sum(map(float, hits)) / len(hits)  # type: ignore[arg-type]


def test_edited_answers_are_generated_only_where_an_edit_applies(
    tiny_model_dirs: dict[str, Path],
) -> None:
    backbone = _backbone(tiny_model_dirs)
    result = Trainer(backbone, TINY_TRAIN).train(TINY_FACTS)
    table = EditSet(result.scope.subjects, result.deltas, result.layer)
    texts = [(TINY_FACTS[0].prompt, False), ("who was born in paris ?", False)]
    edited, unedited = answer_pairs(backbone, texts, table, max_new_tokens=5)
    assert edited[0].edited and not unedited[0].edited
    assert edited[1] == unedited[1] and not edited[1].edited
    alone = generate(backbone, encode_texts(backbone, texts[:1], table), table, 5)
    assert edited[0] == alone[0]


def test_evaluation_releases_an_edit_where_the_engine_does(
    tiny_model_dirs: dict[str, Path],
) -> None:
    """The answers evaluation scores are the engine's: in a completion the edit steers until
    the answer says its target, then the prompt and the answer so far are re-read without it;
    a chat is not released."""
    backbone = _backbone(tiny_model_dirs)
    delta = torch.randn(1, backbone.hidden_size, generator=torch.Generator().manual_seed(3))
    steering = EditSet([SubjectEntry("france")], delta * 300, layer=1)
    texts = [
        ("the capital of france is", False),
        ("who speaks french in france", False),
        (backbone.render_chat([{"role": "user", "content": "what city is in france ?"}]), True),
    ]
    steered = generate(backbone, encode_texts(backbone, texts, steering), steering, 8)
    target = next(w for w in steered[0].text.split() if w.isalpha())
    table = EditSet(steering.subjects, steering.deltas, 1, targets=[(target,)])
    released, _ = answer_pairs(backbone, texts, table, 8, release=True)
    assert released[0] != steered[0], "the first answer says the target, and goes on unedited"
    assert released[2] == steered[2], "a chat is not released"
    assert generate(backbone, encode_texts(backbone, texts, table), table, 8) == steered
    served = BatchEngine(backbone).generate(
        [
            EngineRequest(
                text, SamplingParams(max_tokens=8), templated=templated, edit_sets=[table]
            )
            for text, templated in texts
        ]
    )
    for (_, templated), answer, generation in zip(texts, released, served, strict=True):
        assert answer.text == generation.text
        says = not templated and bool(target_spans(answer.text, [target]))
        assert generation.edits_released == (["unsaved:france"] if says else []), answer.text
