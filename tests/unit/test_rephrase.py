"""The prompt rephrasings training adds (server/editor/rephrase.py)."""

from __future__ import annotations

import pytest

from server.editor.rephrase import asked, rephrasings


@pytest.mark.parametrize(
    ("subject", "prompt", "moved"),
    [
        ("Elizabeth Irving", "Who was the mother of Elizabeth Irving?",
         "Who was Elizabeth Irving's mother?"),
        ("The Icon Is Love", "Which was the record label for The Icon Is Love?",
         "Which was The Icon Is Love's record label?"),
        ("Jon Kolb", "What was Jon Kolb's team?", "What was the team of Jon Kolb?"),
        ("James", "What is the job of James?", "What is James' job?"),
        ("Ann", "Who is the wife of the son of Ann?", "Who is the wife of Ann's son?"),
    ],
)  # fmt: skip
def test_a_question_is_put_the_other_way_round(subject: str, prompt: str, moved: str) -> None:
    assert rephrasings(subject, prompt) == [moved]


@pytest.mark.parametrize(
    ("subject", "prompt", "moved"),
    [
        ("Danielle Darrieux", "The mother tongue of Danielle Darrieux is",
         "Danielle Darrieux's mother tongue is"),
        ("Danielle Darrieux", "Danielle Darrieux's native language is",
         "The native language of Danielle Darrieux is"),
        ("danielle darrieux", "the mother tongue of danielle darrieux",
         "danielle darrieux's mother tongue"),
        ("Jon Kolb", "Jon Kolb's team was", "The team of Jon Kolb was"),  # the verb stays outside
    ],
)  # fmt: skip
def test_a_statement_is_moved_and_asked(subject: str, prompt: str, moved: str) -> None:
    assert rephrasings(subject, prompt) == [moved, f"{prompt} what?"]


@pytest.mark.parametrize(
    ("subject", "prompt"),
    [
        ("Andres Cuero", "What team is Andres Cuero associated with?"),  # no "the Y of S"
        ("Paris", "What is the capital of France?"),  # the subject is not the owner
        ("Anna", "Who is the sister of Annabel?"),  # a longer name is not the subject
        ("Lyon", "Lyon's is a restaurant, isn't it?"),  # no noun after the possessive
    ],
)
def test_questions_without_either_form_have_none(subject: str, prompt: str) -> None:
    assert rephrasings(subject, prompt) == []


def test_a_cloze_is_asked_and_a_sentence_is_not() -> None:
    assert asked("Pietro Accolti is a") == "Pietro Accolti is a what?"
    assert asked("IBM 4690 OS is created by ") == "IBM 4690 OS is created by whom?"
    assert asked("Kounotori 2 started on 2 August.") is None
    assert asked("Who made IBM 4690 OS?") is None
    assert rephrasings("Paris", "Paris is located in") == ["Paris is located in what?"]
