"""The text side of an evaluation: tokenising N items' prompts, paraphrases and locality prompts
with a gated pack's edits placed, one gate query per encoder pass (as `evaluate` did before
EditSet.encode_all) against batched passes. No training: the gate decides from the prompts alone.

    .venv/bin/python bench/gate_encoding.py [--dataset counterfact] [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from server.builder.edits import fact_gate_table
from server.editor.scope import Scope, encode
from server.evaluation.datasets import dataset_path, load_items
from server.gate.encoder import SentenceEncoder
from server.gate.scope_gate import ScopeGate
from server.model import load_backbone
from server.packs.edit_set import EditSet
from server.settings import Settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="counterfact")
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = Settings()
    tokenizer = load_backbone(settings).tokenizer
    items = load_items(dataset_path(settings.data_dir, args.dataset), "test", args.n)
    facts = [it.fact for it in items]
    scope = Scope.from_facts(facts)
    encoder = SentenceEncoder()
    table = fact_gate_table(encoder, facts, scope)
    pairs = [(it.fact.prompt, it.fact.target) for it in items]
    pairs += [(it.generality, it.fact.target) for it in items if it.generality]
    pairs += [(it.locality_prompt, it.locality_target) for it in items if it.locality_prompt]

    def fresh_set() -> EditSet:  # an empty memo each time: no run reads another's embeddings
        gate = ScopeGate(table, SentenceEncoder())  # scores with the table's own head
        blocks = table.prompt_embeddings.new_zeros(len(scope.subjects), 1)
        return EditSet(scope.subjects, blocks, layer=0, gate=gate)

    one_set = fresh_set()
    started = time.perf_counter()
    one_by_one = [encode(tokenizer, one_set.index, c, t, allow=one_set.allow) for c, t in pairs]
    one_s = time.perf_counter() - started
    batched_set = fresh_set()
    started = time.perf_counter()
    batched = batched_set.encode_all(tokenizer, pairs)
    batched_s = time.perf_counter() - started
    same = sum(a.edits == b.edits for a, b in zip(one_by_one, batched, strict=True))
    print(
        json.dumps(
            {
                "dataset": args.dataset,
                "texts": len(pairs),
                "one_query_per_pass_s": round(one_s, 2),
                "batched_s": round(batched_s, 2),
                "speedup": round(one_s / batched_s, 2),
                "same_edits": same,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
