"""What the prompt rephrasings (server/editor/rephrase.py) make of a slice of a dataset: how many
texts, how many items get 0, 1 or 2, how many of the items' evaluation paraphrases are word for
word a made form, and, with `--against REV`, the items whose forms differ from REV's rules.
No model is loaded:

    PYTHONPATH=. .venv/bin/python bench/rephrase_counts.py --dataset zsre --split dev \
        --n 100 --offset 6000 [--against f4b1c1d]
"""

from __future__ import annotations

import argparse
import json
import subprocess
from collections import Counter
from collections.abc import Callable

from bench.harness import add_slice_arguments, slice_items
from server.editor.rephrase import rephrasings
from server.settings import Settings

Rephrase = Callable[[str, str], list[str]]


def rules_at(revision: str) -> Rephrase:
    """`rephrasings` as the module was at a git revision."""
    source = subprocess.run(
        ["git", "show", f"{revision}:server/editor/rephrase.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    namespace: dict = {"__name__": f"rephrase_{revision}"}
    exec(compile(source, f"{revision}:server/editor/rephrase.py", "exec"), namespace)
    return namespace["rephrasings"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_slice_arguments(parser)
    parser.add_argument("--against", metavar="REV", help="a git revision to compare rules with")
    args = parser.parse_args()
    items = slice_items(args, Settings())
    made = [rephrasings(it.fact.subject, it.fact.prompt) for it in items]
    per_item = Counter(len(forms) for forms in made)
    report = {
        "dataset": args.dataset,
        "items": f"{args.split} {args.offset}+{args.n}",
        "texts": sum(per_item[k] * k for k in per_item),
        "items_by_count": dict(sorted(per_item.items())),
        "paraphrase_is_a_made_form": sum(
            1 for it, forms in zip(items, made, strict=True) if it.generality in forms
        ),
    }
    if args.against:
        before = rules_at(args.against)
        changed = [
            (it.fact.prompt, before(it.fact.subject, it.fact.prompt), forms)
            for it, forms in zip(items, made, strict=True)
            if before(it.fact.subject, it.fact.prompt) != forms
        ]
        report[f"items_changed_since_{args.against}"] = len(changed)
        report["changed"] = changed
    print(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
