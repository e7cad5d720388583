"""Where generality is lost: the gate (a paraphrase it does not open) or the edit (opened, the
target's tokens wrong). Trains a pack on N items as `lks eval` does, scores each paraphrase
teacher-forced with the gate and with it forced open (every detected subject edited), and writes
the per-item rows (predicted tokens, the unedited model's) to OUT (the gate research's script
of this name, at ad07891, did the same on the package layout of its day):

    PYTHONPATH=. .venv/bin/python bench/generality_split.py --dataset zsre --split dev \
        --n 100 --offset 6000 --out split.json [--config '{"rephrase": false}']
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from bench.harness import add_slice_arguments, slice_items
from server.builder.edits import train_edits
from server.editor.config import TrainConfig
from server.evaluation.datasets import training_facts
from server.evaluation.evaluate import token_accuracy, top1_predictions
from server.gate.encoder import SentenceEncoder
from server.model import load_backbone, load_training_backbone
from server.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_slice_arguments(parser)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="{}", help="TrainConfig overrides, JSON")
    args = parser.parse_args()
    overrides = {
        k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.config).items()
    }
    settings = Settings()
    items = slice_items(args, settings)
    paraphrased = [it for it in items if it.generality]  # as `lks eval`, items with a paraphrase
    backbone = load_backbone(settings)
    started = time.perf_counter()
    edits = train_edits(
        load_training_backbone(settings, backbone),
        training_facts(items, "heldout"),
        SentenceEncoder(),
        TrainConfig(**overrides),
    )
    seconds = time.perf_counter() - started
    tokenizer, gated = backbone.tokenizer, edits.edit_set
    pairs = [(it.generality, it.fact.target) for it in paraphrased]
    rows: list[dict] = [
        {"prompt": it.fact.prompt, "paraphrase": it.generality, "target": it.fact.target}
        for it in paraphrased
    ]
    for name, table in (("gated", gated), ("forced", dataclasses.replace(gated, gate=None))):
        encoded = table.encode_all(tokenizer, pairs)
        for row, text, predicted in zip(
            rows, encoded, top1_predictions(backbone, encoded, table), strict=True
        ):
            row[name] = token_accuracy(predicted, text.target_ids)
            row[f"{name}_edited"] = bool(text.edits)
            row[f"{name}_predicted"] = tokenizer.decode(predicted)
    unedited = top1_predictions(backbone, gated.encode_all(tokenizer, pairs), None)
    for row, predicted in zip(rows, unedited, strict=True):
        row["unedited_predicted"] = tokenizer.decode(predicted)
    summary = {
        **{k: getattr(args, k) for k in ("dataset", "split", "n", "offset", "config")},
        "train_seconds": round(seconds, 1),
        **{
            key: round(sum(r[key] for r in rows) / len(rows), 4)
            for key in ("gated", "forced", "gated_edited", "forced_edited")
        },
    }
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
