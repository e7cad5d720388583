import pytest

from server.editor.detect import SubjectIndex, last_token_position


def _found(index: SubjectIndex, text: str) -> list[str]:
    return [text[m.start : m.end] for m in index.find(text)]


def test_longest_match_wins_and_several_subjects_are_found() -> None:
    index = SubjectIndex([("Paris", 0), ("Paris Hilton", 1), ("Hilton", 2), ("France", 3)])
    text = "Did Paris Hilton ever visit Paris in France?"
    matches = index.find(text)
    assert [m.row for m in matches] == [1, 0, 3]
    assert _found(index, text) == ["Paris Hilton", "Paris", "France"]


def test_word_boundaries_are_respected() -> None:
    index = SubjectIndex([("Paris", 0), ("Al", 1)])
    assert _found(index, "Parisians and Alfred like Paris.") == ["Paris"]
    assert _found(index, "(Paris)") == ["Paris"]


def test_subjects_ending_in_punctuation() -> None:
    index = SubjectIndex([("Apple Inc.", 0), ("U.S.", 1)])
    assert _found(index, "Apple Inc. is based in the U.S.") == ["Apple Inc.", "U.S."]


def test_case_insensitive_matching_is_optional() -> None:
    names = [("Danielle Darrieux", 0)]
    assert _found(SubjectIndex(names), "danielle darrieux sings") == []
    insensitive = SubjectIndex(names, case_insensitive=True)
    assert _found(insensitive, "DANIELLE DARRIEUX sings") == ["DANIELLE DARRIEUX"]


def test_empty_index_finds_nothing() -> None:
    assert SubjectIndex([]).find("anything at all") == []


@pytest.mark.parametrize(
    ("offsets", "span", "expected"),
    [
        ([(0, 3), (3, 9), (9, 15)], (4, 9), 1),  # "The| Paris| rocks": subject is token 1
        ([(0, 5), (5, 10)], (0, 4), 0),  # the subject's last char sits in a merged token
        ([(0, 0), (0, 4), (4, 6)], (0, 4), 1),  # BOS with (0, 0) offsets is skipped
    ],
)
def test_last_token_position(
    offsets: list[tuple[int, int]], span: tuple[int, int], expected: int
) -> None:
    assert last_token_position(offsets, *span) == expected
