#!/usr/bin/env bash
# A study2 run and its evaluation side by side, one thread each: scripts/study2_run.sh edits and
# snapshots, scripts/study2_eval.sh --follow evaluates each protocol point as its snapshot
# appears, and the run stops at its next snapshot once those evaluations meet the collapse rule
# (so a collapsed method is not edited on to 10,000). Same arguments as study2_run.sh;
# resumable (run it again).
#   bash scripts/study2_go.sh memit-seq 10000 --set lambda_p=5000
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${NAME:-${1:-encore}}
STUDY=${STUDY_DIR:-$HOME/.cache/encore_fast/study2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
bash scripts/study2_run.sh "$@" &
RUNNER=$!
trap 'kill $RUNNER 2>/dev/null || true' EXIT
until [ -f "$STUDY/$RUN/config.json" ]; do  # (the evaluation reads the run's config)
  kill -0 $RUNNER 2>/dev/null || { wait $RUNNER; exit $?; }
  sleep 5
done
bash scripts/study2_eval.sh "$RUN" --follow
wait $RUNNER
trap - EXIT
