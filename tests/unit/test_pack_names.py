import pytest

from server.packs import InvalidPackRefError, PackRef


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("facts", PackRef("facts")),
        ("my-pack_2.1@3", PackRef("my-pack_2.1", 3)),
        ("x@latest", PackRef("x")),
        (" spaced@12 ", PackRef("spaced", 12)),
    ],
)
def test_parses_valid_refs(text: str, expected: PackRef) -> None:
    assert PackRef.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "../etc",
        "a/b",
        "/abs",
        "..",
        "a..b",
        ".hidden",
        "Upper",
        "",
        "x" * 65,
        "name@",
        "name@../1",
        "name@0",
        "name@v2",
        "name@1@2",
        "na me",
    ],
)
def test_refuses_names_that_could_escape_or_are_malformed(text: str) -> None:
    with pytest.raises(InvalidPackRefError, match="invalid pack"):
        PackRef.parse(text)


def test_str_round_trips() -> None:
    for text in ("facts", "facts@7"):
        assert str(PackRef.parse(text)) == text
