#!/usr/bin/env bash
# The protocol study's runs in their committed order (benchmarks/results/README.md, "Which methods
# go on to the 10,000-edit study"), in two lanes meant to run side by side, one thread each:
#   nohup setsid bash scripts/study2_queue.sh a &  nohup setsid bash scripts/study2_queue.sh b &
# Each run is scripts/study2_go.sh (edits and evaluation side by side, stop on collapse) with the
# method's settings from benchmarks/tuned.py; run the lane again after an interruption: a run
# resumes from its state, a finished or stopped one passes at once.
set -euo pipefail
cd "$(dirname "$0")/.."
LANE=${1:?usage: study2_queue.sh a|b}
go() {  # go METHOD EDITS: one run, named as in the comparison (+ -> _)
  local name
  name=${NAME:-$(echo "$1" | tr '+' '_')}
  # shellcheck disable=SC2046
  NAME=$name bash scripts/study2_go.sh "$1" "$2" $(.venv/bin/python benchmarks/tuned.py "$1")
}
case $LANE in
  a) go encore 10000; go alphaedit 10000
     DATA=counterfact-train START=5000 NAME=encore-train go encore 3000
     go rlsedit 10000; go memit-seq+prune 10000; go alphaedit+sphere 10000; go evoedit 10000 ;;
  b) go memit-seq 10000
     DATA=counterfact-train START=5000 NAME=memit-seq-train go memit-seq 3000
     go alphaedit+nas 10000; go memit-seq+rect 10000; go ultraedit 10000 ;;
  *) echo "study2_queue.sh: lane a or b, not '$LANE'" >&2; exit 2 ;;
esac
