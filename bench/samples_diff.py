"""Where two `lks eval --samples` files of the same items differ, and how often an edited chat
answer says its target again right after itself ("German: German"). One block per call:

    .venv/bin/python bench/samples_diff.py A.samples.jsonl.gz B.samples.jsonl.gz
    .venv/bin/python bench/samples_diff.py A.samples.jsonl.gz     # the repeats only
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from collections import Counter
from pathlib import Path


def read_samples(path: Path) -> list[dict]:
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def key(row: dict) -> str:
    return f"{row['context']} {row.get('kind', 'continuation')}"


def said_again_at_once(row: dict) -> bool:
    """The target, then at most a colon, comma, stop or parenthesis, then the target again."""
    target = re.escape(row["target"])
    return bool(re.match(rf"{target}\s*[:,.(]?\s*{target}", row["edited"].strip(), re.I))


def main() -> None:
    first = read_samples(Path(sys.argv[1]))
    if len(sys.argv) > 2:
        second = read_samples(Path(sys.argv[2]))
        assert [(r["prompt"], key(r)) for r in first] == [(r["prompt"], key(r)) for r in second]
        for side in ("unedited", "edited"):
            pairs = zip(first, second, strict=True)
            differ = Counter(key(a) for a, b in pairs if a.get(side) != b.get(side))
            print(f"{side} answers that differ: {sum(differ.values())} {dict(differ)}")
    twice = [
        r
        for r in first
        if r["context"] == "chat" and r.get("kind") != "locality" and r.get("target_repeats")
    ]
    at_once = sum(said_again_at_once(r) for r in twice)
    print(f"chat answers saying the target twice: {len(twice)}, right after itself: {at_once}")


if __name__ == "__main__":
    main()
