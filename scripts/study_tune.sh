#!/usr/bin/env bash
# One tuning run of the study (issue 15): ENCORE, bf16 with fp32 masters, the first N records of
# counterfact-train.json in batches of 100, weight snapshots every 1,000 edits, then evaluated
# like the study (scripts/study_eval.sh). Extra arguments go to `encore-fast eval` (the setting
# tried). Resumable: run it again to continue. One thread.
#   bash scripts/study_tune.sh lp1500-ln20 1000 --set lambda_p=1500 --set lambda_n=20
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=$1
N=$2
shift 2
# (outside the checkout, so that tuning can span sessions)
TUNE=${TUNE_DIR:-${STUDY_DIR:-$HOME/.cache/encore_fast/study}/tune}
OUT=$TUNE/$NAME
DATA=${DATA:-../shared/data/counterfact/counterfact-train.json}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RESUME=()
[ -f "$OUT/config.json" ] && RESUME=(--resume)
.venv/bin/encore-fast eval --method encore --dtype bf16 --dataset "$DATA" --num-edits "$N" \
  --batch-size 100 --eval-every 10 --defer-eval --out "$OUT" --no-plots --quiet \
  "${RESUME[@]}" "$@"
# Evaluated like the study; the unedited model's evaluation is shared by the runs of each length
# (it depends only on the stream and the evaluation settings, not on the setting tried).
STUDY_DIR=$TUNE bash scripts/study_eval.sh "$NAME" --dataset "$DATA"
