"""Preparing requests before the engine: every bound refuses with the field to change, a prompt
refused for its length is never searched for subjects, subject detection and gate queries stay
cheap however often a prompt repeats a subject, and short aliases never match."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch
from factories import TEST_DEVICE
from pydantic import ValidationError

from server.editor.detect import SubjectIndex, SubjectMatch, TokenPositions, last_token_position
from server.editor.facts import Fact
from server.engine.prepare import PromptRejected, RequestLimits, prepare_prompt
from server.engine.sampling import SamplingParams
from server.gate.encoder import SentenceEncoder
from server.gate.scope_gate import ScopeGate
from server.gate.table import GateTable
from server.model import Backbone, load_backbone
from server.packs.edit_set import EditSet, release_targets
from server.packs.format import SubjectEntry
from server.settings import Settings


@pytest.fixture(scope="module")
def backbone(tiny_model_dirs: dict[str, Path]) -> Backbone:
    return load_backbone(Settings(model=tiny_model_dirs["llama"], device=TEST_DEVICE))


def edits_for(backbone: Backbone, *subjects: str) -> EditSet:
    deltas = torch.ones(len(subjects), backbone.hidden_size)
    return EditSet([SubjectEntry(s) for s in subjects], deltas, layer=1, ref="p@1")


LIMITS = RequestLimits(
    max_prompt_chars=200,
    max_chat_messages=3,
    max_stop_strings=2,
    max_stop_chars=5,
    max_subject_matches=4,
    max_request_tokens=40,
)


@pytest.mark.parametrize(
    ("prompt", "params", "param", "setting"),
    [
        ("who was " * 30, SamplingParams(), "prompt", "LKS_MAX_PROMPT_CHARS"),
        ([{"role": "user", "content": "hi"}] * 4, SamplingParams(), "messages",
         "LKS_MAX_CHAT_MESSAGES"),
        ("who", SamplingParams(stop=("a", "b", "c")), "stop", "LKS_MAX_STOP_STRINGS"),
        ("who", SamplingParams(stop=("x" * 6,)), "stop", "LKS_MAX_STOP_CHARS"),
        ("france " * 5, SamplingParams(max_tokens=2), "prompt", "LKS_MAX_SUBJECT_MATCHES"),
        ("who was born in paris", SamplingParams(max_tokens=39), "max_tokens",
         "LKS_MAX_BATCH_TOKENS"),
    ],
)  # fmt: skip
def test_each_bound_refuses_with_the_field_and_the_setting(
    backbone: Backbone, prompt: object, params: SamplingParams, param: str, setting: str
) -> None:
    with pytest.raises(PromptRejected) as refused:
        prepare_prompt(
            backbone, prompt, params, edit_sets=[edits_for(backbone, "france")], limits=LIMITS
        )  # type: ignore[arg-type]
    assert refused.value.param == param and setting in refused.value.message


def test_under_every_bound_the_prompt_is_prepared_with_its_edits(backbone: Backbone) -> None:
    prepared = prepare_prompt(
        backbone,
        "the capital of france is",
        SamplingParams(max_tokens=4, stop=("ab",)),
        edit_sets=[edits_for(backbone, "france")],
        limits=LIMITS,
    )
    assert prepared.token_ids == backbone.tokenizer("the capital of france is").input_ids
    assert [e.label for e in prepared.edits] == ["p@1:france"]


def test_a_prompt_over_the_context_is_refused_before_detection(backbone: Backbone) -> None:
    """Detection would find 2,000 matches (over the cap): the length is checked first."""
    limits = RequestLimits(max_subject_matches=1)
    with pytest.raises(PromptRejected, match="context of 128 tokens"):
        prepare_prompt(
            backbone,
            "france " * 2000,
            SamplingParams(),
            edit_sets=[edits_for(backbone, "france")],
            limits=limits,
        )


def naive_choice(candidates: list[SubjectMatch]) -> list[SubjectMatch]:
    """The quadratic rule the index used to apply: longest first, then leftmost."""
    chosen: list[SubjectMatch] = []
    for m in sorted(candidates, key=lambda m: (-(m.end - m.start), m.start)):
        if all(m.end <= c.start or m.start >= c.end for c in chosen):
            chosen.append(m)
    return sorted(chosen, key=lambda m: m.start)


def test_match_selection_equals_the_longest_first_rule() -> None:
    rng = random.Random(0)
    names = ["new york", "york", "new york city", "city", "ork ci", "new"]
    index = SubjectIndex([(n, i) for i, n in enumerate(names)])
    for _ in range(200):
        words = rng.choices(["new", "york", "city", "of", "the"], k=rng.randint(1, 30))
        text = " ".join(words)
        found = index.find(text)
        spans = {(m.start, m.end, m.row) for m in found}
        assert len(spans) == len(found)
        candidates = []
        for row, name in enumerate(names):
            start = text.find(name)
            while start >= 0:
                end = start + len(name)
                bounded = (start == 0 or not text[start - 1].isalnum()) and (
                    end == len(text) or not text[end].isalnum()
                )
                if bounded:
                    candidates.append(SubjectMatch(start, end, row))
                start = text.find(name, start + 1)
        best = {(m.start, m.end) for m in naive_choice(candidates)}
        assert {(m.start, m.end) for m in found} == best, text


def test_thousands_of_matches_are_selected_in_log_linear_time() -> None:
    """20,000 overlapping candidates: the quadratic loop took minutes, bisection milliseconds."""
    index = SubjectIndex([("ab ab", 0), ("ab", 1)])
    text = "ab " * 20_000
    started = time.perf_counter()
    found = index.find(text)
    assert time.perf_counter() - started < 2.0
    assert len(found) == 10_000 and all(m.row == 0 for m in found)


def test_token_positions_bisect_like_the_scan() -> None:
    offsets = [(0, 3), (3, 4), (4, 9), (9, 9), (9, 12), (12, 12), (12, 15)]
    positions = TokenPositions(offsets)
    for start in range(15):
        for end in range(start + 1, 16):
            try:
                expected = last_token_position(offsets, start, end)
            except ValueError:
                continue
            assert positions.last_token(start, end) == expected, (start, end)


def test_aliases_shorter_than_a_subject_never_match() -> None:
    with pytest.raises(ValidationError, match="alias needs at least"):
        Fact(subject="Paris", prompt="Paris is in", target="Italy", aliases=["P"])
    index = SubjectIndex([("Paris", 0), ("P", 0), (" ", 0)])  # a pack written before the rule
    assert [(m.start, m.end) for m in index.find("P is Paris")] == [(5, 10)]


def test_one_gate_query_per_line_however_often_the_subject_repeats(backbone: Backbone) -> None:
    encoder = SentenceEncoder()
    table = GateTable.build(encoder, ["france is located in"], [["france"]], [0])
    gated = EditSet(
        [SubjectEntry("france")],
        torch.ones(1, backbone.hidden_size),
        layer=1,
        gate=ScopeGate(table, encoder),
    )
    text = "france " * 3000 + "\nwhere is france located?"
    assert len(gated.gate_queries(text)) == 2  # one per line, not 3,001
    encoded = backbone.tokenizer(text, return_offsets_mapping=True)
    positions = TokenPositions([tuple(o) for o in encoded["offset_mapping"]])
    started = time.perf_counter()
    edits = gated.plan(text, positions)
    assert time.perf_counter() - started < 5.0
    # the question's line opens the gate; the line of bare repetitions decides once for all
    assert len(edits) in (1, 3001)
    assert edits[-1].position == positions.last_token(text.rindex("france"), len(text) - 9)


def test_planned_edits_carry_their_subjects_release_targets(backbone: Backbone) -> None:
    """The engine releases an edit once a completion says a release target of its subject:
    the targets of the pack's statement facts (a question's edit is taught to end), each
    subject's in order, once each."""
    subjects = [SubjectEntry("france"), SubjectEntry("rome")]
    facts = [
        ("france", "the capital of france is", "paris"),
        ("france", "the largest city of france is", "lyon"),
        ("france", "france's capital is", "paris"),
        ("france", "what is the capital of france ?", "nice"),
        ("rome", "rome is in", 3),
    ]
    targets = release_targets(subjects, [*facts, ("berlin", "berlin is in", "x")])
    assert targets == [("paris", "lyon"), ()]
    table = EditSet(subjects, torch.ones(2, backbone.hidden_size), layer=1, targets=targets)
    prompt = prepare_prompt(
        backbone, "the capital of france is rome", SamplingParams(), edit_sets=[table]
    )
    assert sorted(e.targets for e in prompt.edits) == [(), ("paris", "lyon")]
    with pytest.raises(ValueError, match="1 target lists for 2 subjects"):
        EditSet(subjects, torch.ones(2, backbone.hidden_size), layer=1, targets=[("a",)])
