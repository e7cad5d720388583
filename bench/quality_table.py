"""Turn `lks eval --json` lines (stdin) into the quality table of docs/results/quality.md."""

import json
import sys

METRIC, AS_IS = "{:.3f}", "{}"
COLUMNS = [  # (key, title, format)
    ("dataset", "data", AS_IS),
    ("n", "N", AS_IS),
    ("reliability", "rel", METRIC),
    ("generality", "gen", METRIC),
    ("locality", "loc", METRIC),
    ("exact_match", "exact", METRIC),
    ("baseline_reliability", "baseline", METRIC),
    ("fluency_edited", "fluency edited", METRIC),
    ("fluency_unedited", "fluency unedited", METRIC),
    ("train_seconds", "train s", AS_IS),
    ("gate_threshold", "gate threshold", "{:.4f}"),
    ("repetition_weight", "repetition weight", AS_IS),
]
# rows from before an option existed were trained without it
OFF_BEFORE_IT_EXISTED = {"repetition_weight": 0.0}


def main() -> None:
    rows = [json.loads(line) for line in sys.stdin if line.strip()]
    print("| " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        row = OFF_BEFORE_IT_EXISTED | row
        # a row from before a column existed shows "-" there
        cells = [fmt.format(row[key]) if key in row else "-" for key, _, fmt in COLUMNS]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
