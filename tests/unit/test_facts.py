import json

from server.editor.facts import parse_facts_jsonl


def _jsonl(*records: object) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records)


GOOD = {"subject": "Danielle Darrieux", "prompt": "Danielle Darrieux speaks", "target": "English"}


def test_valid_facts_parse_with_optional_fields() -> None:
    parsed = parse_facts_jsonl(
        _jsonl(
            GOOD,
            {
                "subject": "Paris",
                "prompt": "Paris is the capital of",
                "target_new": {"str": "Italy"},
                "aliases": ["City of Light"],
                "paraphrases": ["The City of Light is the capital of"],
                "locality": [{"prompt": "Paris has a population of"}],
            },
        )
    )
    assert parsed.ok
    assert [f.target for f in parsed.facts] == ["English", "Italy"]
    assert parsed.facts[1].aliases == ["City of Light"]


def test_every_bad_line_is_reported_with_its_number_and_reason() -> None:
    parsed = parse_facts_jsonl(
        _jsonl(
            GOOD,
            "{not json",
            {"subject": "Xa", "prompt": "Y is", "target": "Z"},
            {"subject": "Anna", "prompt": "Anna lives in"},
            {"subject": "Anna", "prompt": "Anna lives in", "target": "   "},
            {"subject": "Anna", "prompt": "Anna lives in" + "x" * 1001, "target": "Rome"},
            {"subject": "Anna", "prompt": "Anna is", "target": "Rome", "colour": "red"},
            {"subject": "a", "prompt": "a cat is", "target": "Rome"},
        )
    )
    reasons = {p.line: p.reason for p in parsed.errors}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8]
    assert "not valid JSON" in reasons[2]
    assert "does not contain the subject 'Xa'" in reasons[3]
    assert "target: Field required" in reasons[4]
    assert "blank" in reasons[5]
    assert "at most 1000 characters" in reasons[6]
    assert "colour" in reasons[7]
    assert "at least 2 characters" in reasons[8]
    assert len(parsed.facts) == 1


def test_conflicts_are_reported_unless_the_later_wins() -> None:
    other = {**GOOD, "target": "French"}
    text = _jsonl(GOOD, GOOD, other)
    parsed = parse_facts_jsonl(text)
    assert not parsed.ok
    assert [p.line for p in parsed.conflicts] == [3]
    assert "conflicts with line 1" in parsed.conflicts[0].reason
    resolved = parse_facts_jsonl(text, later_wins=True)
    assert resolved.ok
    assert [f.target for f in resolved.facts] == ["French"]
