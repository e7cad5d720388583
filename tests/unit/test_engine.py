"""The batching engine on tiny random models of every family: a row's answer never depends on
its batch (padding, companions with other packs or none, joining mid-flight)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import TEST_DEVICE
from tiny_models import FAMILIES

from server.editor.answers import MAX_RELEASES
from server.engine.engine import (
    Admitted,
    BatchEngine,
    EngineEvent,
    EngineRequest,
    Finished,
    Generation,
    TextDelta,
)
from server.engine.prepare import PreparedPrompt, prepare_prompt
from server.engine.sampling import SamplingParams
from server.model import Backbone, load_backbone
from server.packs.edit_set import EditSet
from server.packs.format import SubjectEntry
from server.settings import Settings

PROMPTS = [
    "the capital of france is",
    "who was born in the city of rome and speaks",
    "berlin",
    "the mother tongue of danielle darrieux is",
    "what river is in the city of paris",
]


# transformers swaps the tiny word-level tokenizer of the qwen2 fixture for Qwen2Tokenizer, which
# cannot encode its words: subjects are not found there. Its attention is llama's plus biases.
ENGINE_FAMILIES = [f for f in FAMILIES if f != "qwen2"]


@pytest.fixture(scope="module", params=ENGINE_FAMILIES)
def backbone(request: pytest.FixtureRequest, tiny_model_dirs: dict[str, Path]) -> Backbone:
    return load_backbone(Settings(model=tiny_model_dirs[request.param], device=TEST_DEVICE))


def edit_set(backbone: Backbone, subject: str, seed: int, ref: str) -> EditSet:
    delta = torch.randn(1, backbone.hidden_size, generator=torch.Generator().manual_seed(seed))
    return EditSet([SubjectEntry(subject)], delta * 300, layer=1, ref=ref)


def alone(backbone: Backbone, request: EngineRequest) -> Generation:
    fresh = EngineRequest(request.text, request.params, edit_sets=request.edit_sets)
    return BatchEngine(backbone, max_batch_size=1).generate([fresh])[0]


def test_greedy_is_deterministic_and_respects_max_tokens(backbone: Backbone) -> None:
    engine = BatchEngine(backbone)
    params = SamplingParams(max_tokens=6)
    (first,) = engine.generate([EngineRequest(PROMPTS[0], params)])
    (second,) = engine.generate([EngineRequest(PROMPTS[0], params)])
    assert first == second
    assert first.prompt_tokens == len(backbone.tokenizer(PROMPTS[0]).input_ids)
    assert 1 <= first.tokens <= 6
    assert first.finish_reason == ("length" if first.tokens == 6 else "stop")


def test_rows_of_a_mixed_batch_equal_each_row_alone(backbone: Backbone) -> None:
    """Different lengths (left padding), two packs, no pack, greedy and seeded sampling."""
    france = edit_set(backbone, "france", 1, "a@1")
    rome = edit_set(backbone, "rome", 2, "b@1")
    requests = [
        EngineRequest(PROMPTS[0], SamplingParams(max_tokens=8), edit_sets=[france]),
        EngineRequest(PROMPTS[1], SamplingParams(max_tokens=5), edit_sets=[rome]),
        EngineRequest(PROMPTS[2], SamplingParams(max_tokens=9)),
        EngineRequest(PROMPTS[0], SamplingParams(max_tokens=8)),
        EngineRequest(PROMPTS[4], SamplingParams(max_tokens=7, temperature=1.3, seed=11)),
        EngineRequest(PROMPTS[1], SamplingParams(max_tokens=6), edit_sets=[france, rome]),
        EngineRequest("who speaks french in france", SamplingParams(max_tokens=4)),
        EngineRequest(
            "who speaks french in france", SamplingParams(max_tokens=4), edit_sets=[france]
        ),
    ]
    batched = BatchEngine(backbone).generate(requests)
    for request, result in zip(requests, batched, strict=True):
        assert result == alone(backbone, request), request.text
    assert batched[0].edits_applied == ["a@1:france"]
    assert batched[3].edits_applied == []
    assert batched[7].token_ids != batched[6].token_ids, "the edit must change its own row"
    assert batched[5].edits_applied == ["b@1:rome"]


def test_requests_joining_and_leaving_mid_flight_are_unaffected(backbone: Backbone) -> None:
    engine = BatchEngine(backbone, max_batch_size=3)
    france = edit_set(backbone, "france", 3, "a@1")
    requests = [
        EngineRequest(p, SamplingParams(max_tokens=3 + 2 * i), edit_sets=[france] if i % 2 else [])
        for i, p in enumerate(PROMPTS * 2)
    ]
    results: dict[int, Generation] = {}

    def collect(event: EngineEvent, index: int) -> None:
        if isinstance(event, Finished):
            results[index] = event.generation

    for index, request in enumerate(requests):
        request.sink = lambda event, index=index: collect(event, index)
    pending = list(requests)
    engine.add(pending.pop(0))
    while engine.has_work() or pending:
        engine.step()
        if pending:
            engine.add(pending.pop(0))  # one joins after every step: continuous batching
        assert engine.running <= 3
    for index, request in enumerate(requests):
        assert results[index] == alone(backbone, request), request.text


def test_stream_events_add_up_to_the_result_and_stop_strings_cut(backbone: Backbone) -> None:
    engine = BatchEngine(backbone)
    (plain,) = engine.generate([EngineRequest(PROMPTS[1], SamplingParams(max_tokens=12))])
    words = plain.text.split()
    assert len(words) >= 3, plain.text
    stop = words[2]
    events: list[EngineEvent] = []
    request = EngineRequest(PROMPTS[1], SamplingParams(max_tokens=12, stop=(stop,)))
    request.sink = events.append
    (cut,) = engine.generate([request])
    assert isinstance(events[0], Admitted) and isinstance(events[-1], Finished)
    assert cut.text == plain.text[: plain.text.index(stop)]
    assert cut.finish_reason == "stop"
    streamed = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert streamed == cut.text
    assert stop not in streamed


def test_aborting_one_row_leaves_the_others_intact(backbone: Backbone) -> None:
    engine = BatchEngine(backbone)
    requests = [EngineRequest(p, SamplingParams(max_tokens=10)) for p in PROMPTS[:3]]
    finished: dict[int, Generation] = {}
    for index, request in enumerate(requests):
        request.sink = lambda e, i=index: (
            finished.__setitem__(i, e.generation) if isinstance(e, Finished) else None
        )
        engine.add(request)
    engine.step()
    assert engine.abort(requests[1].request_id)
    engine.run_until_done()
    assert finished[1].finish_reason == "abort"
    assert finished[0] == alone(backbone, requests[0])
    assert finished[2] == alone(backbone, requests[2])


@pytest.mark.parametrize(
    "params",
    [
        {"max_tokens": 0},
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": float("nan")},
        {"stop": ("",)},
    ],
)
def test_sampling_params_reject_nonsense(params: dict[str, float]) -> None:
    """Real errors, not asserts: they hold under `python -O` too."""
    with pytest.raises(ValueError):
        SamplingParams(**params)  # type: ignore[arg-type]


def test_a_prompt_over_the_context_is_rejected(backbone: Backbone) -> None:
    too_long = EngineRequest("who was born in paris " * 25, SamplingParams(max_tokens=30))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        BatchEngine(backbone).generate([too_long])


LONG_PROMPT = " ".join(["who was born in the city of rome and speaks"] * 3 + ["in france"])


def test_a_chunked_prefill_gives_the_tokens_of_one_pass(backbone: Backbone) -> None:
    """Chunks of 8 tokens: the edit on the subject lands in a later chunk; a short row joins in
    the same step; every row equals the engine without chunking."""
    france = edit_set(backbone, "france", 4, "a@1")
    requests = [
        (LONG_PROMPT, SamplingParams(max_tokens=6), [france]),
        (LONG_PROMPT, SamplingParams(max_tokens=6), []),
        (PROMPTS[2], SamplingParams(max_tokens=5), [france]),
    ]
    prompt_tokens = len(backbone.tokenizer(LONG_PROMPT).input_ids)
    assert prompt_tokens > 3 * 8
    whole = BatchEngine(backbone).generate(
        [EngineRequest(t, p, edit_sets=e) for t, p, e in requests]
    )
    chunked = BatchEngine(backbone, prefill_chunk_tokens=8).generate(
        [EngineRequest(t, p, edit_sets=e) for t, p, e in requests]
    )
    assert chunked == whole
    assert chunked[0].edits_applied == ["a@1:france"]
    assert chunked[0].token_ids != chunked[1].token_ids, "the edit in a later chunk applies"


def test_running_rows_keep_decoding_between_the_chunks_of_a_long_prompt(
    backbone: Backbone,
) -> None:
    engine = BatchEngine(backbone, prefill_chunk_tokens=8)
    short = EngineRequest(PROMPTS[0], SamplingParams(max_tokens=40, ignore_eos=True))
    tokens: list[int] = []
    short.sink = lambda e: tokens.append(1) if isinstance(e, TextDelta) else None
    engine.add(short)
    engine.step()
    long = EngineRequest(LONG_PROMPT, SamplingParams(max_tokens=4))
    admitted: list[EngineEvent] = []
    long.sink = admitted.append
    engine.add(long)
    chunks = -(-len(backbone.tokenizer(LONG_PROMPT).input_ids) // 8)
    before = len(tokens)
    for _ in range(chunks - 1):
        engine.step()
        assert engine.running == 1, "the long prompt is still being prefilled"
    assert len(tokens) >= before + chunks - 2, "the short row decoded during the prefill"
    engine.step()
    assert engine.running == 2
    engine.run_until_done()
    assert isinstance(admitted[-1], Finished)


def test_the_token_budget_admits_what_fits_and_the_rest_waits(backbone: Backbone) -> None:
    params = SamplingParams(max_tokens=6)
    spans = [len(backbone.tokenizer(p).input_ids) + 6 for p in PROMPTS[:3]]
    engine = BatchEngine(backbone, max_batch_tokens=2 * max(spans))
    requests = [EngineRequest(p, params) for p in PROMPTS[:3]]
    for request in requests:
        engine.add(request)
    engine.step()
    assert engine.running == 2 and len(engine.waiting) == 1
    engine.run_until_done()
    results = BatchEngine(backbone).generate([EngineRequest(p, params) for p in PROMPTS[:3]])
    again = BatchEngine(backbone, max_batch_tokens=2 * max(spans)).generate(
        [EngineRequest(p, params) for p in PROMPTS[:3]]
    )
    assert again == results
    with pytest.raises(ValueError, match="token budget"):
        BatchEngine(backbone, max_batch_tokens=8).generate([EngineRequest(PROMPTS[1], params)])


def test_seeded_sampling_is_the_same_in_any_batch_and_differs_by_seed(backbone: Backbone) -> None:
    """Sampling runs where the logits are, each seeded row on its own generator."""

    def sampled(seed: int) -> EngineRequest:
        params = SamplingParams(max_tokens=9, temperature=1.5, top_p=0.9, seed=seed)
        return EngineRequest(PROMPTS[1], params)

    batch = [sampled(5), EngineRequest(PROMPTS[0], SamplingParams(max_tokens=9)), sampled(6)]
    together = BatchEngine(backbone).generate(batch)
    assert together[0] == alone(backbone, sampled(5))
    assert together[2] == alone(backbone, sampled(6))
    assert together[0].token_ids != together[2].token_ids


def first_word_at(backbone: Backbone, token_ids: list[int]) -> tuple[str, int]:
    """The first generated word and how many tokens it takes to say it (word-level tokenizer:
    a token is a word or a punctuation mark)."""
    for k in range(1, len(token_ids) + 1):
        word = backbone.tokenizer.decode(token_ids[k - 1 : k]).strip()
        if word.isalpha():
            return word, k
    raise AssertionError(f"no word among {token_ids}")


def with_targets(edits: EditSet, *targets: str) -> EditSet:
    return EditSet(edits.subjects, edits.deltas, edits.layer, ref=edits.ref, targets=[targets])


@pytest.mark.parametrize(
    ("slot_cache", "chunk"),
    [(True, None), (False, None), (True, 4)],
    ids=["slots", "dynamic-cache", "chunked-prefill"],
)
def test_an_edit_is_released_once_the_answer_says_its_target(
    backbone: Backbone, slot_cache: bool, chunk: int | None
) -> None:
    """Up to its target the answer is the edited one; after it, the continuation of the
    prompt and that answer re-read without the released edit (another pack's edit keeps
    steering), and a companion row is unaffected. (On a tiny random model the released edit
    may not have changed what follows: the audit trail says it was released.)"""
    text, params = (
        "who was born in the city of rome and speaks french in france",
        SamplingParams(max_tokens=10, ignore_eos=True),
    )
    france, rome = edit_set(backbone, "france", 4, "a@1"), edit_set(backbone, "rome", 5, "b@1")
    steered = BatchEngine(backbone, slot_cache=slot_cache, release_answered_edits=False)
    (edited,) = steered.generate([EngineRequest(text, params, edit_sets=[france, rome])])
    word, k = first_word_at(backbone, edited.token_ids)
    assert k < params.max_tokens
    released_set = with_targets(france, word)
    engine = BatchEngine(backbone, slot_cache=slot_cache, prefill_chunk_tokens=chunk)
    companion = EngineRequest(PROMPTS[3], SamplingParams(max_tokens=7), edit_sets=[rome])
    request = EngineRequest(text, params, edit_sets=[released_set, rome])
    released, beside = engine.generate([request, companion])

    assert released.token_ids[:k] == edited.token_ids[:k]
    assert released.edits_applied == edited.edits_applied == ["a@1:france", "b@1:rome"]
    assert (released.edits_released, edited.edits_released) == (["a@1:france"], [])
    # the rest: prompt + answer so far, re-read with rome's edit alone
    prompt = prepare_prompt(backbone, text, params, edit_sets=[rome])
    resumed = PreparedPrompt(prompt.token_ids + edited.token_ids[:k], prompt.edits)
    rest_params = SamplingParams(max_tokens=params.max_tokens - k, ignore_eos=True)
    (rest,) = BatchEngine(backbone, slot_cache=slot_cache).generate(
        [EngineRequest("", rest_params, prompt=resumed)]
    )
    assert released.token_ids[k:] == rest.token_ids
    assert beside == alone(backbone, companion)


def test_an_edit_whose_target_is_never_said_steers_every_token(backbone: Backbone) -> None:
    france = edit_set(backbone, "france", 4, "a@1")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    (steered,) = BatchEngine(backbone, release_answered_edits=False).generate(
        [EngineRequest(PROMPTS[0], params, edit_sets=[france])]
    )
    unsaid = next(w for w in ("green", "blue", "red", "football") if w not in steered.text)
    (kept,) = BatchEngine(backbone).generate(
        [EngineRequest(PROMPTS[0], params, edit_sets=[with_targets(france, unsaid)])]
    )
    assert kept == steered and kept.edits_released == []


def test_a_row_rejoins_at_most_max_releases_times_and_the_last_releases_every_edit(
    backbone: Backbone,
) -> None:
    """Five edits that change nothing (zero deltas): four with targets the answer says one
    word after another (its first words, one more each: a tiny random model loops over a few
    words), one with a target it never says. Three rejoins release one edit each, the fourth
    releases the two left, and the answer is the unreleased one throughout."""
    text = "who was born in the city of rome and speaks french in france"
    subjects = ["born", "city", "rome", "speaks", "france"]
    sets = [
        EditSet([SubjectEntry(s)], torch.zeros(1, backbone.hidden_size), layer=1, ref=f"p{i}@1")
        for i, s in enumerate(subjects)
    ]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    (plain,) = BatchEngine(backbone, release_answered_edits=False).generate(
        [EngineRequest(text, params, edit_sets=sets)]
    )
    decode = backbone.tokenizer.decode
    ends = [
        k
        for k in range(1, len(plain.token_ids) + 1)
        if decode(plain.token_ids[k - 1 : k]).strip().isalpha()
    ][:MAX_RELEASES]
    # each target said before the last token (where the row ends instead of rejoining)
    assert len(ends) == MAX_RELEASES and ends[-1] < params.max_tokens, plain.text
    said = [decode(plain.token_ids[:k]).strip() for k in ends]
    unsaid = next(w for w in ("zebra", "green", "football", "blue") if w not in plain.text)
    labelled = [with_targets(e, t) for e, t in zip(sets, [*said, unsaid], strict=True)]
    labels = [f"p{i}@1:{s}" for i, s in enumerate(subjects)]
    reads: list[int] = []  # tokens read by each pass: a prefill reads more than one
    handle = backbone.model.get_decoder().register_forward_hook(
        lambda _m, _a, out: reads.append(out.last_hidden_state.shape[1])
    )
    try:
        (released,) = BatchEngine(backbone).generate(
            [EngineRequest(text, params, edit_sets=labelled)]
        )
    finally:
        handle.remove()
    prompt = len(backbone.tokenizer(text)["input_ids"])

    assert released.token_ids == plain.token_ids
    # the prompt's prefill, then one rejoin (prompt and answer so far) after each of the four
    # targets, the fourth releasing the two edits left: no fifth
    assert [n for n in reads if n > 1] == [prompt] + [prompt + k for k in ends], reads
    assert released.edits_released == labels


def test_a_chat_is_never_released(backbone: Backbone) -> None:
    """Training teaches a chat answer its end: the edit steers it to the end, even after the
    answer says the target."""
    france = edit_set(backbone, "france", 4, "a@1")
    chat = backbone.render_chat([{"role": "user", "content": PROMPTS[0]}])
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    request = EngineRequest(chat, params, templated=True, edit_sets=[france])
    (steered,) = BatchEngine(backbone, release_answered_edits=False).generate([request])
    word, _ = first_word_at(backbone, steered.token_ids)
    targeted = EngineRequest(chat, params, templated=True, edit_sets=[with_targets(france, word)])
    (served,) = BatchEngine(backbone).generate([targeted])
    assert served == steered and served.edits_released == []
