#!/usr/bin/env bash
# The 1,000-edit comparison of the new methods (issue 25) under the study's protocol, on the
# study's stream (counterfact-edit.json), each with the setting its tuning chose
# (benchmarks/tuned.py, from results/tuning-25/summary.json), with ENCORE, MEMIT-seq and
# AlphaEdit on their study settings: every method on the same 1,000-record stream, so that all
# share one unedited evaluation (the baselines of realistic NS) and the same facts (paired).
# Resumable. Then:
#   python benchmarks/study2_report.py --runs ~/.cache/encore_fast/study2 --points 1000 \
#     --out benchmarks/results/compare25-1k --methods encore-1k <the other -1k runs>
set -euo pipefail
cd "$(dirname "$0")/.."
METHODS=${METHODS:-"encore memit-seq alphaedit emmet evoedit rlsedit ultraedit alphaedit+nas alphaedit+sphere memit-seq+rect memit-seq+prune"}
for METHOD in $METHODS; do
  SETS=$(.venv/bin/python benchmarks/tuned.py "$METHOD")  # (fails: not tuned yet)
  RUN=$(echo "$METHOD" | tr '+' '_')-1k
  # shellcheck disable=SC2086
  NAME=$RUN bash scripts/study2_run.sh "$METHOD" 1000 $SETS
  AT=1000 bash scripts/study2_eval.sh "$RUN"
done
