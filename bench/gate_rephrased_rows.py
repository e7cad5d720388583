"""Research: does the gate open for more paraphrases when its table also holds each prompt's
rephrasings (server/editor/rephrase.py, the forms training reads) as rows of the same fact?
Prints recall and shut rate, bare and in chat, for the pack's table and for the table with those
rows, on dev items, then bench/gate_phrasing.py's user phrasings. Needs only the encoder:

    PYTHONPATH=. .venv/bin/python bench/gate_rephrased_rows.py [--cache enc.pt]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.gate_phrasing import ASKS, CASES, OTHERS, opened, render_chat
from bench.gate_recall import CachedEncoder
from server.builder.edits import fact_gate_table
from server.editor.facts import Fact
from server.editor.rephrase import rephrasings
from server.editor.scope import Scope
from server.evaluation.datasets import dataset_path, load_items
from server.gate.encoder import SentenceEncoder
from server.gate.scope_gate import ScopeGate
from server.packs.edit_set import EditSet
from server.settings import Settings


def edit_set(encoder: SentenceEncoder, facts: list[Fact], rephrased_rows: bool) -> EditSet:
    """A gate-only edit set; with `rephrased_rows`, each rephrasing is one more row of its fact
    (a fact of its own with the same subject and target: same subject row, answered row too)."""
    scope = Scope.from_facts(facts)
    rows = list(facts)
    if rephrased_rows:
        rows += [
            Fact(subject=f.subject, prompt=form, target=f.target)
            for f in facts
            for form in rephrasings(f.subject, f.prompt)
        ]
    table = fact_gate_table(encoder, rows, Scope.from_facts(rows))
    assert len(Scope.from_facts(rows).subjects) == len(scope.subjects)
    return EditSet(scope.subjects, None, 0, gate=ScopeGate(table, encoder))  # type: ignore[arg-type]


def rate(gated: EditSet, texts: list[str], want_open: bool) -> float:
    return round(sum(opened(gated, t) == want_open for t in texts) / max(len(texts), 1), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--cache", type=Path)
    args = parser.parse_args()
    encoder = CachedEncoder(args.cache) if args.cache else SentenceEncoder()
    for dataset in ("zsre", "counterfact"):
        path = dataset_path(Settings().data_dir, dataset)
        items = load_items(path, "dev", args.n, args.offset)
        paraphrases = [it.generality for it in items if it.generality]
        localities = [it.locality_prompt for it in items if it.locality_prompt]
        for rephrased in (False, True):
            gated = edit_set(encoder, [it.fact for it in items], rephrased)
            print(json.dumps({
                "dataset": dataset, "offset": args.offset, "rephrased_rows": rephrased,
                "recall_bare": rate(gated, paraphrases, True),
                "recall_chat": rate(gated, [render_chat(p) for p in paraphrases], True),
                "shut_bare": rate(gated, localities, False),
                "shut_chat": rate(gated, [render_chat(p) for p in localities], False),
            }))  # fmt: skip
    facts = [Fact(subject=s, prompt=p, target=t) for s, p, t, _, _ in CASES]
    for rephrased in (False, True):
        gated = edit_set(encoder, facts, rephrased)
        print(json.dumps({
            "dataset": "gate_phrasing", "rephrased_rows": rephrased,
            "recall_bare": f"{sum(opened(gated, q) for q in ASKS)}/{len(ASKS)}",
            "shut_bare": f"{sum(not opened(gated, q) for q in OTHERS)}/{len(OTHERS)}",
        }))  # fmt: skip
    if isinstance(encoder, CachedEncoder):
        encoder.save()


if __name__ == "__main__":
    main()
