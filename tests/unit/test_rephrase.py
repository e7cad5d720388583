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
        ("Josef Mai", "What was the date of Josef Mai's death?",
         "What was the date of the death of Josef Mai?"),  # "of Josef Mai's" is not "of S"
        ("C++", "Who is the creator of C++?", "Who is C++'s creator?"),  # escaped, not a pattern
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
        ("Lyon", "Who is the mayor of Lyon-Villeurbanne?"),  # a longer name
        ("Ann", "Who is Marie-Ann's son?"),  # the subject inside a longer name
    ],
)
def test_questions_without_either_form_have_none(subject: str, prompt: str) -> None:
    assert rephrasings(subject, prompt) == []


@pytest.mark.parametrize(
    "prompt",
    [
        "Henry IV of England's life ended in",  # the noun phrase goes on with a verb
        "Paul Broca's domain of activity is",  # ... with "of"
        "Paul Broca's father works as a",
    ],
)
def test_a_possessed_phrase_that_goes_on_is_not_moved(prompt: str) -> None:
    subject = prompt.split("'s")[0]
    assert rephrasings(subject, prompt) == [f"{prompt} what?"]


def test_a_cloze_is_asked_and_a_sentence_is_not() -> None:
    assert asked("Pietro Accolti is a") == "Pietro Accolti is a what?"
    assert asked("IBM 4690 OS is created by ") == "IBM 4690 OS is created by whom?"
    assert asked("Kounotori 2 started on 2 August.") is None
    assert asked("Who made IBM 4690 OS?") is None
    assert asked("Who is the mother of Ann") is None  # a question without its "?"
    assert asked("Is Ann a painter? She is") is None
    assert asked("The capital of X,") is None
    assert rephrasings("Paris", "Paris is located in") == ["Paris is located in what?"]
