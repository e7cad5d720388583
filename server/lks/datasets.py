"""The benchmark sets (zsRE, CounterFact) as published with the LKS paper, with our splits:
dev = items 0-7,999 (tune on these), test = 8,000-9,999 (report only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from server.lks.evaluate import EvalItem
from server.lks.facts import Fact

DatasetName = Literal["zsre", "counterfact"]
Split = Literal["dev", "test"]
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
    """Items offset..offset+n of the split, as facts (subject, prompt, target) plus the held-out
    generality and locality prompts used for evaluation only."""
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
