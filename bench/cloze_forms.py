"""Which user message a CounterFact cloze prompt becomes in the chat context (answers.py): the
unedited model's chat answer to each form, judged by whether its first sentence says the item's
ground truth, on dev items only:

    PYTHONPATH=. .venv/bin/python bench/cloze_forms.py --n 40
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from server.editor.answers import answer_hit, encode_texts, generate
from server.model import load_backbone
from server.settings import Settings

log = logging.getLogger("cloze_forms")
FORMS = ("Complete: {p}", "Complete the sentence: {p}", "{p}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/counterfact.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    items = json.loads(args.data.read_text())[: args.n]  # dev items 0..n-1
    backbone = load_backbone(Settings())
    for form in FORMS:
        texts = [
            (backbone.render_chat([{"role": "user", "content": form.format(p=i["prompt"])}]), True)
            for i in items
        ]
        answers = generate(backbone, encode_texts(backbone, texts, None), None)
        hits = sum(
            answer_hit(a.text, [i["ground_truth"]]) for a, i in zip(answers, items, strict=True)
        )
        stops = sum(a.stopped for a in answers)
        log.info(
            "%-28r ground truth in the first sentence %d of %d, stops %d",
            form,
            hits,
            len(items),
            stops,
        )


if __name__ == "__main__":
    main()
