#!/usr/bin/env bash
# Evaluate the snapshots of a study run (scripts/study_run.sh) as they appear, on one thread:
# ES/PS/NS/S and realistic accuracy on a fixed sample of 300 edited facts, the forgetting curve
# (first 1,000 facts), the six downstream tasks, WikiText-2 perplexity, 200 known facts.
#   bash scripts/study_eval.sh encore [--follow]
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${1:-encore}
shift || true
# (outside the checkout, so that a run can span sessions; runs/study may link to it)
STUDY=${STUDY_DIR:-$HOME/.cache/encore_fast/study}
OUT=${OUT:-$STUDY/${NAME:-$METHOD}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# The unedited model's evaluation depends only on the stream (its length: the sample is drawn
# from it) and on the settings below, not on the method: the first run's is shared by the others.
N=$(.venv/bin/python -c 'import json, sys; print(json.load(open(sys.argv[1]))["num_edits"])' \
    "$OUT/config.json")
BASE=$STUDY/baseline-$N.jsonl
[ -f "$OUT/evals.jsonl" ] || [ ! -f "$BASE" ] || cp "$BASE" "$OUT/evals.jsonl"
.venv/bin/encore-fast eval-snapshots "$OUT" --dtype bf16 --eval-sample 300 --realistic \
  --forgetting 1000 --downstream auto --quiet "$@"
if [ ! -f "$BASE" ]; then
  head -n 1 "$OUT/evals.jsonl" > "$BASE.tmp" && mv "$BASE.tmp" "$BASE"
fi
