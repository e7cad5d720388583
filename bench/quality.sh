#!/usr/bin/env bash
# The quality table of docs/results/quality.md: `lks eval` on the test split (heldout protocol),
# one JSON line per run.
# Usage: bench/quality.sh [N ...]   (default: 10 100 1000 2000, 2-3 hours on 2 CPU cores:
#        CounterFact N=2000 took 35 minutes with the machine to itself, N=100 2)
#        bench/quality.sh 10 100 | tee quality.jsonl | python3 bench/quality_table.py
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("${@:-10 100 1000 2000}")
for n in ${sizes[@]}; do
  for dataset in zsre counterfact; do
    .venv/bin/lks eval --dataset "$dataset" --split test --n "$n" --json
  done
done
