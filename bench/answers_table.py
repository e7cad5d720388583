"""`lks eval --json` lines (stdin) as docs/results/natural_edits.md's tables (stdout).

bench/answers_table.py contexts < row.json   # one row per context and kind, for one run
bench/answers_table.py runs < rows.jsonl     # one row per run, chat context
"""

from __future__ import annotations

import json
import sys

F = "{:.2f}"


def contexts(row: dict) -> list[str]:
    lines = []
    for context in row["contexts"].split(","):
        for kind in ("question", "paraphrase"):
            p = f"{context}_{kind}"
            cells = [
                row[f"{p}_answer_hit"],
                row[f"{p}_answer_hit_unedited"],
                row[f"{p}_degenerate"],
                row[f"{p}_degenerate_unedited"],
                row[f"{p}_target_repeats"],
                row[f"{p}_stops"],
                row[f"{p}_stops_unedited"],
                row[f"{p}_edited"],
            ]
            lines.append(f"| {context} | {kind} | " + " | ".join(F.format(c) for c in cells) + " |")
        kept = F.format(row[f"{context}_locality"])
        opened = F.format(row[f"{context}_locality_edited"])
        lines.append(f"| {context} | other question: unchanged {kept} | | | | | | | | {opened} |")
    return lines


def options(row: dict) -> str:
    parts = [f"repetition {row['repetition_weight']}"]
    if row.get("teacher_weight"):
        parts.append(f"teacher {row['teacher_weight']} ({row['teacher_contexts']})")
    for key in ("teacher_tokens", "epochs"):
        if key in row:
            parts.append(f"{key} {row[key]}")
    return ", ".join(parts)


def runs(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        c = "chat_question"
        cells = [
            F.format(row[f"{c}_answer_hit"]),
            F.format(row["chat_paraphrase_answer_hit"]),
            f"{F.format(row[f'{c}_degenerate'])} / {F.format(row[f'{c}_degenerate_unedited'])}",
            F.format(row[f"{c}_target_repeats"]),
            f"{F.format(row[f'{c}_stops'])} / {F.format(row[f'{c}_stops_unedited'])}",
            F.format(row["chat_locality"]),
            "{:.3f}".format(row["reliability"]),
            "{:.3f}".format(row["generality"]),
            "{:.3f}".format(row["locality"]),
            str(row["train_seconds"]),
        ]
        name = row.get("run", "")
        lines.append(f"| {name} | {options(row)} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    mode = sys.argv[1]
    rows = [json.loads(line) for line in sys.stdin if line.strip()]
    out = contexts(rows[0]) if mode == "contexts" else runs(rows)
    print("\n".join(out))


if __name__ == "__main__":
    main()
