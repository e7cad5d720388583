"""Where two `lks eval --samples` files of the same items differ (the answers both hold), and
how often an edited chat answer says its target twice (by kind) and again right after itself
("German: German"); with `--split-at`, the chat answer metrics over the items before and from
that one. One block per call:

    .venv/bin/python bench/samples_diff.py A.samples.jsonl.gz B.samples.jsonl.gz
    .venv/bin/python bench/samples_diff.py A.samples.jsonl.gz [--split-at 100]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import Counter
from pathlib import Path

from server.editor.answers import target_spans


def read_samples(path: Path) -> list[dict]:
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def key(row: dict) -> str:
    return f"{row['context']} {row.get('kind', 'continuation')}"


def answer_id(row: dict) -> tuple:
    """One answer of a run: files of runs with other `--contexts` share the contexts both ran."""
    return row.get("item"), row["context"], row.get("kind"), row["prompt"]


def said_again_at_once(row: dict) -> bool:
    """The answer starts with the target, then at most a colon, comma, stop or parenthesis,
    then the target again (the target matched as the answer metrics match it)."""
    text = row["edited"].strip()
    spans = target_spans(text, [row["target"]])
    return (
        len(spans) > 1
        and spans[0][0] == 0
        and re.fullmatch(r"\s*[:,.(]?\s*", text[spans[0][1] : spans[1][0]]) is not None
    )


# what --split-at prints per item range: the answer metrics of `lks eval`, from each answer
SPLIT_FIGURES = (
    ("target twice", "target_repeats"),
    ("hit", "answer_hit"),
    ("stops", "stops_edited"),
    ("degenerate", "degenerate_edited"),
)


def rates_by_kind(rows: list[dict], field: str) -> dict[str, float]:
    """The share of `rows` of each kind (question, paraphrase) whose `field` is true."""
    return {
        kind: round(
            sum(bool(r.get(field)) for r in rows if r["kind"] == kind)
            / max(sum(r["kind"] == kind for r in rows), 1),
            3,
        )
        for kind in sorted({r["kind"] for r in rows})
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", type=Path, nargs="+", help="one or two --samples files")
    parser.add_argument("--split-at", type=int, help="also count items before / from this one")
    args = parser.parse_args()
    first = read_samples(args.samples[0])
    if len(args.samples) > 1:
        second = {answer_id(r): r for r in read_samples(args.samples[1])}
        pairs = [(r, second[answer_id(r)]) for r in first if answer_id(r) in second]
        assert pairs, "the two files share no answers (other items or other contexts)"
        print(f"answers in both files: {len(pairs)} of {len(first)} and {len(second)}")
        for side in ("unedited", "edited"):
            differ = Counter(key(a) for a, b in pairs if a.get(side) != b.get(side))
            print(f"{side} answers that differ: {sum(differ.values())} {dict(differ)}")
    asked = [r for r in first if r["context"] == "chat" and r.get("kind") != "locality"]
    twice = [r for r in asked if r.get("target_repeats")]
    at_once = sum(said_again_at_once(r) for r in twice)
    print(f"chat answers saying the target twice: {len(twice)}, right after itself: {at_once}")
    kinds = dict(Counter(r["kind"] for r in twice)), dict(Counter(r["kind"] for r in asked))
    print(f"  by kind: {kinds[0]} of {kinds[1]}")
    if args.split_at is not None:
        for name, part in (
            (f"items < {args.split_at}", [r for r in asked if r["item"] < args.split_at]),
            (f"items >= {args.split_at}", [r for r in asked if r["item"] >= args.split_at]),
        ):
            for label, field in SPLIT_FIGURES:
                print(f"  {name}: {label} {rates_by_kind(part, field)}")


if __name__ == "__main__":
    main()
