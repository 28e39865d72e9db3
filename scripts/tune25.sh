#!/usr/bin/env bash
# The tuning runs of the new methods on SmolLM2-135M (benchmarks/results/tuning-25/README.md
# gives the rule): every candidate of candidates.tsv, 500 edits of counterfact-train.json
# records 0-499, one evaluation at the end. Resumable: finished candidates are skipped, an
# interrupted one resumes. TUNE_DIR: where the run folders go; ONLY: run just these names.
#   bash scripts/tune25.sh            # all
#   ONLY="emmet-a emmet-b" bash scripts/tune25.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TUNE=${TUNE_DIR:-$HOME/.cache/encore_fast/tuning-25}
DATA=$(.venv/bin/encore-fast data path counterfact-train)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$TUNE"
grep -v '^#' benchmarks/results/tuning-25/candidates.tsv | while IFS=$'\t' read -r NAME METHOD SETTINGS; do
  [ -z "$NAME" ] && continue
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $NAME "* ]]; then continue; fi
  OUT=$TUNE/$NAME
  if [ -f "$OUT/results.jsonl" ] && .venv/bin/python -c 'import json, sys
lines = [json.loads(x) for x in open(sys.argv[1]) if x.strip().endswith("}")]
sys.exit(0 if any(x.get("type") == "eval" and x.get("edits_done") == 500 for x in lines) else 1)' \
      "$OUT/results.jsonl"; then
    continue  # (done)
  fi
  SETS=()
  for s in $SETTINGS; do SETS+=(--set "$s"); done
  RESUME=()
  [ -f "$OUT/config.json" ] && RESUME=(--resume)
  echo "$(date -u +%FT%TZ) $NAME: $METHOD $SETTINGS"
  .venv/bin/encore-fast eval --method "$METHOD" --preset smollm2-135m --dtype bf16 \
    --dataset "$DATA" --num-edits 500 --batch-size 100 --eval-every 5 \
    --eval-sampling edited --eval-sample 500 --wikitext auto --ppl-tokens 20000 \
    --known-facts none --downstream none --forgetting 0 --out "$OUT" --no-plots --quiet \
    "${RESUME[@]}" "${SETS[@]}" </dev/null
done
