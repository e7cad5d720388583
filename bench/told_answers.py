"""Research (issue 20): the told model's answers, measured by the answer metrics.

The unedited model with "Fact: <prompt> <target>." before the question (the training teacher's
context) is the issue's picture of an answer "as the model would give it if its input said the
new fact". Its target-twice, loop and end-of-turn rates are the reference the edited answers can
be read against. Greedy 40 tokens, test split:

    PYTHONPATH=. .venv/bin/python bench/told_answers.py zsre --n 100 --offset 1000
"""

from __future__ import annotations

import argparse
import json

from server.editor.answers import (
    answer_hit,
    degenerate,
    encode_texts,
    generate,
    target_repeats,
    user_message,
)
from server.editor.sequences import TEACHER_FACT
from server.evaluation.datasets import dataset_path, load_items
from server.model import load_backbone
from server.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["zsre", "counterfact"])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--offset", type=int, default=1000)
    args = parser.parse_args()
    settings = Settings()
    items = load_items(dataset_path(settings.data_dir, args.dataset), "test", args.n, args.offset)
    backbone = load_backbone(settings)
    report: dict[str, float] = {}
    for kind in ("question", "paraphrase"):
        asked = [(it, it.fact.prompt if kind == "question" else it.generality) for it in items]
        asked = [(it, prompt) for it, prompt in asked if prompt]
        for context in ("chat", "bare"):
            texts = []
            for it, prompt in asked:
                told = TEACHER_FACT.format(prompt=it.fact.prompt.strip(), target=it.fact.target)
                if context == "chat":
                    chat = [{"role": "user", "content": told + user_message(prompt)}]
                    texts.append((backbone.render_chat(chat), True))
                else:
                    texts.append((told + prompt, False))
            answers = generate(backbone, encode_texts(backbone, texts, None), None)
            targets = [(it.fact.target,) for it, _ in asked]
            pairs = list(zip(answers, targets, strict=True))
            key = f"told_{context}_{kind}"
            report[f"{key}_answer_hit"] = sum(answer_hit(a.text, t) for a, t in pairs) / len(pairs)
            report[f"{key}_target_repeats"] = sum(
                target_repeats(a.text, t) for a, t in pairs
            ) / len(pairs)
            report[f"{key}_degenerate"] = sum(degenerate(a.text) for a, _ in pairs) / len(pairs)
            report[f"{key}_stops"] = sum(a.stopped for a, _ in pairs) / len(pairs)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
