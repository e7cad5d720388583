"""Growth by applying the previous weights (the worker's first try), with and without reusing
what the previous version computed: train a pack on N CounterFact dev facts, grow it by M, and
time the subject table, the gate table and the quality check both ways.

    .venv/bin/python bench/grow_reuse.py [--facts 1000] [--added 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from server.builder.edits import KnownParts, apply_edits, train_edits
from server.builder.version import facts_to_check
from server.evaluation.datasets import dataset_path, load_items
from server.evaluation.evaluate import EvalItem, evaluate
from server.gate.encoder import SentenceEncoder
from server.model import load_backbone
from server.settings import Settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=1000)
    parser.add_argument("--added", type=int, default=100)
    parser.add_argument("--offset", type=int, default=4000, help="first CounterFact dev item")
    parser.add_argument("--check-sample", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = Settings(dtype="float32")  # what the server trains on, whatever it serves in
    backbone, encoder = load_backbone(settings), SentenceEncoder()
    path = dataset_path(settings.data_dir, "counterfact")
    items = load_items(path, "dev", args.facts + args.added, args.offset)
    old, grown = [it.fact for it in items[: args.facts]], [it.fact for it in items]

    def timed(fn):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        value = fn()
        return value, round(time.perf_counter() - started, 2)

    trained, full_s = timed(lambda: train_edits(backbone, old, encoder))
    weights = trained.result.hypernet.state_dict()
    known = KnownParts.from_content(trained.content(old))
    plain, plain_s = timed(lambda: apply_edits(backbone, grown, encoder, weights).result)
    reused_edits, reused_s = timed(
        lambda: apply_edits(backbone, grown, encoder, weights, known=known)
    )
    reused, edit_set = reused_edits.result, reused_edits.edit_set
    checked = facts_to_check(grown, reused.scope, known, args.check_sample)
    everything, all_s = timed(
        lambda: evaluate(backbone, [EvalItem(f) for f in grown], edit_set, generations=False)
    )
    sample, sample_s = timed(
        lambda: evaluate(backbone, [EvalItem(f) for f in checked], edit_set, generations=False)
    )
    record = {
        "facts": args.facts,
        "added": args.added,
        "full_train_seconds": full_s,
        "apply_seconds_recomputed": plain_s,
        "apply_seconds_reused": reused_s,
        "max_block_difference": float((plain.deltas - reused.deltas).abs().max()),
        "check_all_facts": len(grown),
        "check_all_seconds": all_s,
        "check_all_reliability": round(everything["reliability"], 4),
        "check_sampled_facts": len(checked),
        "check_sampled_seconds": sample_s,
        "check_sampled_reliability": round(sample["reliability"], 4),
        "device": str(backbone.device),
    }
    print(json.dumps(record))
    if args.json:
        args.json.write_text(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
