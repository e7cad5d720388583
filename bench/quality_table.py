"""Turn `lks eval --json` lines (stdin) into the quality table of docs/results/quality.md (stdout).

The headline is what a user reads (issue 20): greedy chat answers, edited against unedited
(answer_hit on the question and its paraphrase, degenerate answers, the target said twice,
answers that stop, same-subject other questions unchanged), then bare-prompt degeneration;
the teacher-forced scores follow as secondary columns. Rows from before the answer metrics
show "-" there."""

import json
import sys

METRIC, AS_IS = "{:.3f}", "{}"
COLUMNS = [  # (key, title, format)
    ("dataset", "data", AS_IS),
    ("n", "N", AS_IS),
    ("chat_question_answer_hit", "chat hit q", METRIC),
    ("chat_paraphrase_answer_hit", "chat hit para", METRIC),
    ("chat_question_degenerate", "chat degen edited", METRIC),
    ("chat_question_degenerate_unedited", "chat degen unedited", METRIC),
    ("chat_question_target_repeats", "chat target x2", METRIC),
    ("chat_question_stops", "chat stops", METRIC),
    ("chat_locality", "chat loc", METRIC),
    ("bare_question_degenerate", "bare degen edited", METRIC),
    ("bare_question_degenerate_unedited", "bare degen unedited", METRIC),
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
