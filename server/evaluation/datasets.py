"""The benchmark sets (zsRE, CounterFact) as published with the LKS paper, with our splits:
dev = items 0-7,999 (tune on these), test = 8,000-9,999 (report only).

Two protocols say what training may read of an item:
- heldout: subject, prompt and target only; generality and locality prompts are evaluation only.
- reference: also the item's locality prompt, as preservation supervision (the LKS reference
  code's loss_loc), so its locality figure is measured on prompts training has seen.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from server.editor.facts import Fact, LocalityPrompt
from server.evaluation.evaluate import EvalItem

DatasetName = Literal["zsre", "counterfact"]
Split = Literal["dev", "test"]
EvalProtocol = Literal["heldout", "reference"]
PROTOCOLS: tuple[EvalProtocol, ...] = ("heldout", "reference")
SPLITS: dict[str, tuple[int, int]] = {"dev": (0, 8000), "test": (8000, 10000)}


def dataset_path(data_dir: Path, dataset: str) -> Path:
    candidate = Path(dataset)
    if candidate.suffix == ".json" and candidate.is_file():
        return candidate
    path = data_dir / f"{dataset}.json"
    if not path.is_file():
        raise FileNotFoundError(f"dataset {dataset!r} not found at {path}; set LKS_DATA_DIR")
    return path


def load_items(path: Path, split: Split, n: int, offset: int = 0) -> list[EvalItem]:
    """Items offset..offset+n of the split, as facts (subject, prompt, target) plus the
    generality and locality prompts for evaluation; `training_facts` decides what training sees."""
    first, end = SPLITS[split]
    start = first + offset
    if n < 1 or offset < 0 or start + n > end:
        raise ValueError(f"the {split} split holds items 0..{end - first - 1}; asked {offset}+{n}")
    raw = json.loads(path.read_text())[start : start + n]
    return [
        EvalItem(
            fact=Fact(subject=r["subject"], prompt=r["prompt"], target=r["target"]),
            generality=r.get("generality"),
            locality_prompt=(r.get("locality") or {}).get("prompt"),
            locality_target=(r.get("locality") or {}).get("target"),
        )
        for r in raw
    ]


def training_facts(items: Sequence[EvalItem], protocol: EvalProtocol) -> list[Fact]:
    """What training may read of each item under `protocol` (the items themselves keep every
    prompt for evaluation)."""
    if protocol == "heldout":
        return [item.fact for item in items]
    if protocol == "reference":
        return [
            item.fact.model_copy(
                update={
                    "locality": [*item.fact.locality, LocalityPrompt(prompt=item.locality_prompt)]
                }
            )
            if item.locality_prompt
            else item.fact
            for item in items
        ]
    raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def describe_protocol(protocol: EvalProtocol) -> str:
    """One line for a human reader: what training saw."""
    if protocol == "reference":
        return "reference (training also saw each item's locality prompt)"
    return "heldout (training saw subject, prompt and target only)"
