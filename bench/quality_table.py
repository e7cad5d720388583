"""Turn `lks eval --json` lines (stdin) into the README's quality table (stdout)."""

import json
import sys

COLUMNS = [
    ("dataset", "data"),
    ("n", "N"),
    ("reliability", "rel"),
    ("generality", "gen"),
    ("locality", "loc"),
    ("exact_match", "exact"),
    ("baseline_reliability", "baseline"),
    ("fluency_edited", "fluency edited"),
    ("fluency_unedited", "fluency unedited"),
    ("train_seconds", "train s"),
    ("gate_threshold", "gate threshold"),
]


def main() -> None:
    rows = [json.loads(line) for line in sys.stdin if line.strip()]
    print("| " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        cells = []
        for key, _ in COLUMNS:
            value = row.get(key, "-")  # rows from before a column existed
            if key == "gate_threshold" and isinstance(value, float):
                cells.append(f"{value:.4f}")
            elif isinstance(value, float) and key != "train_seconds":
                cells.append(f"{value:.3f}")
            else:
                cells.append(str(value))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
