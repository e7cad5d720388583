"""Research script (not kept): the gate's recall and shut rate at other thresholds over a pack
of dev items 0-999 (zsRE and CounterFact), to see what lowering the threshold would buy.

    PYTHONPATH=. .venv/bin/python bench/gate_threshold_sweep.py dev 1000 0
"""

import sys
from pathlib import Path

import torch

from bench.gate_phrasing import gated_set
from bench.gate_recall import CachedEncoder
from server.evaluation.datasets import dataset_path, load_items
from server.settings import Settings

enc = CachedEncoder(Path(".scratch/enc_cache.pt"))


def scores(es, texts):
    out = []
    for t in texts:
        ms = es.index.find(t)
        out.append(
            max(
                (es.gate.score(t, m.start, m.end, m.row, es._names(m.row)) for m in ms),
                default=float("-inf"),
            )
        )
    return torch.tensor(out)


split, n, off = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for ds in ("zsre", "counterfact"):
    items = load_items(dataset_path(Settings().data_dir, ds), split, n, off)
    es, _ = gated_set(enc, [it.fact for it in items], answer_rows=True)
    p = scores(es, [it.generality for it in items if it.generality])
    shut = scores(es, [it.locality_prompt for it in items if it.locality_prompt])
    print(ds, split, off, n, "threshold", es.gate.threshold)
    for th in (0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1008, 0.11):
        print(
            f"  th {th:.4f} recall {(p >= th).float().mean():.4f}",
            f"shut {(shut < th).float().mean():.4f}",
        )
enc.save()
