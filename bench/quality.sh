#!/usr/bin/env bash
# The README's quality table: `lks eval` on the test split (heldout protocol), one JSON line per run.
# Usage: bench/quality.sh [N ...]   (default: 10 100; N=1000 takes about an hour on 2 CPU cores)
#        bench/quality.sh 10 100 | tee quality.jsonl | python3 bench/quality_table.py
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("${@:-10 100}")
for n in ${sizes[@]}; do
  for dataset in zsre counterfact; do
    .venv/bin/lks eval --dataset "$dataset" --split test --n "$n" --json
  done
done
