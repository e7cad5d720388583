"""Fit the scope gate's relation head (server/gate/relation_head.safetensors) on dev items.

Each zsRE and CounterFact dev item gives an edit prompt, its paraphrase (the gate should open)
and another question about the same subject (it should stay shut). CounterFact items also give
near misses (`--near-misses`): the prompt against a template of another relation group that reads
like it, or against its own template less one content word ("X is a twin city of" vs "X is a city
of"); relation groups come from linking each prompt template to its paraphrase's, without labels.
The head is fitted on items 1,000-7,999 of both datasets; its threshold is the best balanced
accuracy on items 0-999, which the fit never saw; the test split is never read. About 10 minutes
on 2 CPU cores.

    .venv/bin/python -m tools.fit_relation_head [--out server/gate/relation_head.safetensors]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from server.evaluation.datasets import dataset_path, load_items
from server.gate.encoder import ENCODER_NAME, SentenceEncoder
from server.gate.relation_head import HEAD_FILE, RelationHead
from server.settings import Settings
from tools.relation_fit import (
    NearMisses,
    Probes,
    RelationExample,
    RelationPairs,
    auc,
    balanced_threshold,
    fit_relation_head,
    pair_scores,
    relation_groups,
)

DATASETS = ("zsre", "counterfact")
FIT_ITEMS = (1000, 8000)  # dev items the head learns from
THRESHOLD_ITEMS = (0, 1000)  # dev items that pick the threshold and report the figures


def examples(
    settings: Settings, dataset: str, first: int, end: int
) -> tuple[list[RelationExample], list[str]]:
    """(examples, their edits' targets) from dev items first..end-1."""
    items = load_items(dataset_path(settings.data_dir, dataset), "dev", end - first, first)
    kept = [it for it in items if it.generality and it.locality_prompt]
    return [
        RelationExample(it.fact.subject, it.fact.prompt, it.generality, it.locality_prompt)
        for it in kept
    ], [it.fact.target for it in kept]


def open_rates(positive: torch.Tensor, negative: torch.Tensor, threshold: float) -> dict:
    return {
        "paraphrase_open": round(float((positive >= threshold).float().mean()), 4),
        "other_open": round(float((negative >= threshold).float().mean()), 4),
        "auc": round(auc(positive, negative), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HEAD_FILE)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--identity-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--near-misses",
        nargs="*",
        default=["counterfact"],
        choices=DATASETS,
        help="also fit on near-miss negatives mined from these datasets' relation groups",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("fit_relation_head")
    torch.manual_seed(args.seed)
    settings = Settings()
    identity = RelationHead.identity(384)
    encoder = SentenceEncoder(relation_head=identity)
    started = time.perf_counter()
    fit_sets, held_sets = [], {}
    for dataset in DATASETS:
        fit_examples, targets = examples(settings, dataset, *FIT_ITEMS)
        fit_sets.append(RelationPairs.encode(encoder, fit_examples))
        held_examples, _ = examples(settings, dataset, *THRESHOLD_ITEMS)
        held_sets[dataset] = RelationPairs.encode(encoder, held_examples)
        if dataset in args.near_misses:
            groups = relation_groups(fit_examples, targets, encoder)
            near_misses = NearMisses.find(groups, encoder)
            mined = near_misses.examples(fit_examples, seed=args.seed)
            log.info("%s: %d relation groups, %d near-miss examples", dataset,
                     len(set(groups.values())), len(mined))  # fmt: skip
            fit_sets.append(RelationPairs.encode(encoder, mined))
            held_mined = near_misses.examples(held_examples, seed=args.seed)
            held_sets[f"{dataset}_near_miss"] = RelationPairs.encode(encoder, held_mined)
    probes = Probes.encode(encoder)
    log.info("encoded %d fit and %d threshold examples in %.0f s",
             sum(map(len, fit_sets)), sum(map(len, held_sets.values())),
             time.perf_counter() - started)  # fmt: skip
    started = time.perf_counter()
    weight = fit_relation_head(
        fit_sets, probes, steps=args.steps, identity_weight=args.identity_weight, seed=args.seed
    )
    log.info("fitted the head in %.0f s", time.perf_counter() - started)
    report: dict[str, dict] = {}
    for name, head_weight, fixed in (("identity", identity.weight, identity.threshold),
                                     ("head", weight, None)):  # fmt: skip
        with torch.no_grad():
            scores = {
                ds: pair_scores(head_weight, pairs, probes) for ds, pairs in held_sets.items()
            }
        # the threshold is picked on the datasets' own other questions, as before
        positive = torch.cat([scores[ds][0] for ds in DATASETS])
        negative = torch.cat([scores[ds][1] for ds in DATASETS])
        threshold = fixed if fixed is not None else balanced_threshold(positive, negative)
        report[name] = {"threshold": round(threshold, 4)} | {
            ds: open_rates(p, n, threshold) for ds, (p, n) in scores.items()
        }
    head = RelationHead(weight, report["head"]["threshold"])
    metadata = {
        "encoder": ENCODER_NAME,
        "fit_items": f"dev {FIT_ITEMS[0]}-{FIT_ITEMS[1] - 1} of {', '.join(DATASETS)}",
        "threshold_items": f"dev {THRESHOLD_ITEMS[0]}-{THRESHOLD_ITEMS[1] - 1}",
        "steps": str(args.steps),
        "identity_weight": str(args.identity_weight),
        "seed": str(args.seed),
        "near_misses": ",".join(args.near_misses) or "none",
        "dev_report": json.dumps(report),
    }
    head.save(args.out, metadata)
    print(json.dumps(report, indent=1))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
