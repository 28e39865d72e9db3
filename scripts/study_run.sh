#!/usr/bin/env bash
# One sequential run of the 10,000-edit study (issue 15): SmolLM2-135M, bf16 with fp32 master
# weights, counterfact-edit.json in batches of 100, weight snapshots every 1,000 edits
# (evaluated beside it by scripts/study_eval.sh). Resumable: run it again to continue. Extra
# arguments go to `encore-fast eval` (e.g. the setting chosen by scripts/study_tune.sh); NAME
# names the run folder (default: the method).
#   bash scripts/study_run.sh encore 10000
#   NAME=encore-lp150 bash scripts/study_run.sh encore 10000 --set lambda_p=150
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${1:-encore}
N=${2:-10000}
shift 2 || shift $#
# (outside the checkout, so that a run can span sessions; runs/study may link to it)
OUT=${OUT:-${STUDY_DIR:-$HOME/.cache/encore_fast/study}/${NAME:-$METHOD}}
RESUME=()
[ -f "$OUT/config.json" ] && RESUME=(--resume)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/encore-fast eval --method "$METHOD" --dtype bf16 --num-edits "$N" \
  --batch-size 100 --eval-every 10 --defer-eval --out "$OUT" --no-plots "${RESUME[@]}" "$@"
