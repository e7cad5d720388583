"""What the exact-match and fluency figures of `lks eval --samples` files are made of.

N-gram entropy scores an empty generation 0 and a list of different words high, whatever they
say; this counts both. One block per file:

    .venv/bin/python bench/generation_samples.py bench/quality_samples/zsre_test_2000.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def describe(samples: list[dict]) -> list[str]:
    silent = [s for s in samples if not s["unedited"].strip()]
    spoke = [s for s in samples if s["unedited"].strip()]
    repeats = [s for s in samples if s["edited"].count(s["target"].strip()) >= 2]
    lines = [
        f"unedited generation empty (end of sequence at once): {len(silent)} of {len(samples)}",
        f"edited generation says the target more than once: {len(repeats)} of {len(samples)}",
    ]
    if spoke:
        unedited = statistics.fmean(s["fluency_unedited"] for s in spoke)
        edited = statistics.fmean(s["fluency_edited"] for s in spoke)
        lines.append(
            f"fluency where the unedited model says something ({len(spoke)} items): "
            f"unedited {unedited:.3f}, edited {edited:.3f}"
        )
    return lines


def main(paths: list[str]) -> None:
    for path in paths:
        print(f"{path}:")
        print("\n".join(f"  {line}" for line in describe(read_jsonl(Path(path)))))


if __name__ == "__main__":
    main(sys.argv[1:])
