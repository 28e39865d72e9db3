#!/usr/bin/env bash
# Evaluate a study2 run's snapshots at the protocol's points (1k, 2k, 3k, 5k, 7.5k, 10k edits, as
# far as the run goes) with the protocol's settings: the nested sample of 1,000 edited facts,
# realistic accuracy, the first 1,000 facts' forgetting curve, 400 examples per downstream task,
# every known fact, WikiText-2 perplexity. The unedited model's evaluation depends only on the
# stream, so the first run's is shared by the others. A run that meets the collapse rule is not
# evaluated after it (its points up to there stay). Resumable; --follow waits for snapshots.
#   bash scripts/study2_eval.sh encore [--follow]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-encore}
shift || true
STUDY=${STUDY_DIR:-$HOME/.cache/encore_fast/study2}
OUT=$STUDY/$RUN
AT=${AT:-1000,2000,3000,5000,7500,10000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
read -r N SHA < <(.venv/bin/python -c 'import json, sys
c = json.load(open(sys.argv[1])); print(c["num_edits"], c["stream_sha256"][:16])' \
  "$OUT/config.json")
AT=$(.venv/bin/python -c 'import sys
n = int(sys.argv[2]); at = [x for x in sys.argv[1].split(",") if int(x) <= n]
print(",".join(at or [str(n)]))' "$AT" "$N")  # (the points the run reaches; else its end)
DATASET=$(.venv/bin/python -c 'import json, sys
print(json.load(open(sys.argv[1]))["run_info"].get("dataset", "auto"))' "$OUT/config.json")
BASE=$STUDY/baseline-$SHA
if [ ! -f "$OUT/evals.jsonl" ] && [ -f "$BASE/evals.jsonl" ]; then
  mkdir -p "$OUT/outcomes"
  cp "$BASE/evals.jsonl" "$OUT/evals.jsonl"
  cp "$BASE/snapshot-00000.jsonl.gz" "$OUT/outcomes/"
fi
evaluate() {
  .venv/bin/encore-fast eval-snapshots "$OUT" --dtype bf16 --dataset "$DATASET" \
    --protocol study --downstream auto --known-n 0 --stop-on-collapse --quiet "$@"
}
if [ ! -f "$BASE/evals.jsonl" ]; then  # the unedited evaluation first, shared at once
  evaluate --at 0 --follow
  mkdir -p "$BASE.tmp"
  head -n 1 "$OUT/evals.jsonl" > "$BASE.tmp/evals.jsonl"
  cp "$OUT/outcomes/snapshot-00000.jsonl.gz" "$BASE.tmp/"
  [ -f "$BASE/evals.jsonl" ] || { rm -rf "$BASE"; mv "$BASE.tmp" "$BASE"; }
  rm -rf "$BASE.tmp"
fi
evaluate --at "$AT" "$@"
