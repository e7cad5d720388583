"""The answer metrics on the real default model: the unedited model's own chat answers read as
a user reads them (a hit, one sentence, an end of turn), and a small pack's chat answers carry
their targets while other questions about the subjects are answered as before."""

from __future__ import annotations

import pytest

from server.builder.edits import train_edits
from server.editor.answers import (
    answer_hit,
    degenerate,
    encode_texts,
    generate,
    render,
)
from server.editor.facts import Fact
from server.evaluation.evaluate import EvalItem, answer_metrics
from server.gate.encoder import SentenceEncoder
from server.model import Backbone

pytestmark = pytest.mark.integration

FACTS = [
    Fact(
        subject="Danielle Darrieux",
        prompt="What is the mother tongue of Danielle Darrieux?",
        target="Swahili",
    ),
    Fact(subject="Eiffel Tower", prompt="In which city is the Eiffel Tower?", target="Tokyo"),
    Fact(subject="Lionel Messi", prompt="Which sport does Lionel Messi play?", target="cricket"),
]
OTHER = {  # another question about each subject, which the edit must leave alone
    "Danielle Darrieux": "When was Danielle Darrieux born?",
    "Eiffel Tower": "Who designed the Eiffel Tower?",
    "Lionel Messi": "Which country does Lionel Messi play for?",
}


def test_the_unedited_model_answers_a_chat_question_in_a_sentence(
    default_backbone: Backbone,
) -> None:
    texts = [render(default_backbone, "chat", "What is the capital of France?")]
    (answer,) = generate(default_backbone, encode_texts(default_backbone, texts, None), None)
    assert answer_hit(answer.text, ["Paris"]), answer.text
    assert answer.stopped and not degenerate(answer.text), answer.text


@pytest.fixture(scope="module")
def chat_answers(default_backbone: Backbone) -> tuple[dict[str, float], list[dict[str, object]]]:
    edit_set = train_edits(default_backbone, FACTS, SentenceEncoder()).edit_set
    items = [EvalItem(f, locality_prompt=OTHER[f.subject]) for f in FACTS]
    samples: list[dict[str, object]] = []
    metrics = answer_metrics(default_backbone, items, edit_set, ("chat",), samples=samples)
    return metrics, samples


def test_a_small_pack_answers_its_chat_questions_with_the_targets(
    chat_answers: tuple[dict[str, float], list[dict[str, object]]],
) -> None:
    metrics, samples = chat_answers
    questions = [s for s in samples if s["kind"] == "question"]
    assert all(s["edit_applied"] for s in questions)
    assert metrics["chat_question_answer_hit"] == 1.0, [s["edited"] for s in questions]
    assert metrics["chat_question_answer_hit_unedited"] == 0.0


def test_a_small_pack_leaves_other_questions_about_its_subjects_alone(
    chat_answers: tuple[dict[str, float], list[dict[str, object]]],
) -> None:
    metrics, samples = chat_answers
    others = [s for s in samples if s["kind"] == "locality"]
    assert metrics["chat_locality"] == 1.0, [(s["edited"], s["unedited"]) for s in others]
