"""Benchmark items and the protocols that say what training may read of them."""

import json
from pathlib import Path

import pytest

from server.editor.facts import Fact
from server.evaluation.datasets import load_items, training_facts
from server.evaluation.evaluate import EvalItem

ITEM = {
    "subject": "Danielle Darrieux",
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target": "English",
    "ground_truth": "French",
    "locality": {"prompt": "The birth year of Danielle Darrieux is", "target": "1917"},
    "generality": "Danielle Darrieux's native language is",
}


@pytest.fixture
def items(tmp_path: Path) -> list[EvalItem]:
    path = tmp_path / "set.json"
    no_locality = {k: v for k, v in ITEM.items() if k != "locality"}
    path.write_text(json.dumps([ITEM, no_locality]))
    return load_items(path, "dev", 2)


def test_heldout_training_reads_only_the_edit(items: list[EvalItem]) -> None:
    facts = training_facts(items, "heldout")
    assert [f.model_dump(exclude_defaults=True) for f in facts] == [
        {"subject": ITEM["subject"], "prompt": ITEM["prompt"], "target": ITEM["target"]}
    ] * 2
    assert items[0].generality == ITEM["generality"]  # kept for evaluation
    assert items[0].locality_prompt == ITEM["locality"]["prompt"]


def test_reference_training_also_reads_the_locality_prompt(items: list[EvalItem]) -> None:
    facts = training_facts(items, "reference")
    assert [p.prompt for p in facts[0].locality] == [ITEM["locality"]["prompt"]]
    assert facts[1].locality == []  # an item without one trains as under heldout
    assert [f.key for f in facts] == [i.fact.key for i in items]
    assert all(f.paraphrases == [] for f in facts)  # the generality prompt stays held out
    assert items[0].fact.locality == []  # the items are not changed


def test_unknown_protocol_is_refused() -> None:
    item = EvalItem(Fact(subject="ab", prompt="ab is", target="b"))
    with pytest.raises(ValueError, match="unknown protocol"):
        training_facts([item], "both")  # type: ignore[arg-type]
