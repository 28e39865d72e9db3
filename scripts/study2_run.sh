#!/usr/bin/env bash
# One run of the study under the evaluation protocol (issue 24): SmolLM2-135M in bf16 with fp32
# master weights, a CounterFact stream in batches of 100, immediate efficacy of every batch, and
# a weight snapshot every 500 edits (scripts/study2_eval.sh evaluates those at the protocol's
# points; run it beside with --follow and the run stops once those evaluations meet the collapse
# rule). Resumable: run it again to continue. Extra arguments go to `encore-fast eval`.
#   bash scripts/study2_run.sh encore 10000 --set lambda_p=5000 --set lambda_n=20
#   DATA=counterfact-train START=5000 NAME=encore-train bash scripts/study2_run.sh encore 3000
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${1:-encore}
N=${2:-10000}
shift 2 || shift $#
STUDY=${STUDY_DIR:-$HOME/.cache/encore_fast/study2}
OUT=$STUDY/${NAME:-$METHOD}
DATA=${DATA:-counterfact-edit}  # a data set's name, or a file
[ -f "$DATA" ] || DATA=$(.venv/bin/encore-fast data path "$DATA")
if [ -n "${START:-}" ]; then  # a stream that starts later in the file: a copy of its records
  mkdir -p "$STUDY/streams"
  STREAM=$STUDY/streams/$(basename "$DATA" .json)-from-$START.json
  [ -f "$STREAM" ] || .venv/bin/python -c 'import json, sys
records = json.load(open(sys.argv[1]))[int(sys.argv[2]):]
json.dump(records, open(sys.argv[3] + ".tmp", "w"))' "$DATA" "$START" "$STREAM"
  [ -f "$STREAM" ] || mv "$STREAM.tmp" "$STREAM"
  DATA=$STREAM
fi
RESUME=()
[ -f "$OUT/config.json" ] && RESUME=(--resume)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/encore-fast eval --method "$METHOD" --dtype bf16 --dataset "$DATA" \
  --num-edits "$N" --batch-size 100 --eval-every 5 --defer-eval --protocol study \
  --out "$OUT" --no-plots --quiet --stop-on-collapse "${RESUME[@]}" "$@"
