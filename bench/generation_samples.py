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


def continuations(records: list[dict]) -> list[dict]:
    """The bare continuations of a samples file (since issue 20 it also holds answers in each
    context; older files hold continuations only, without a context)."""
    return [r for r in records if r.get("context", "continuation") == "continuation"]


def main(paths: list[str]) -> None:
    for path in paths:
        print(f"{path}:")
        samples = continuations(read_jsonl(Path(path)))
        print("\n".join(f"  {line}" for line in describe(samples)))


if __name__ == "__main__":
    main(sys.argv[1:])
