#!/usr/bin/env bash
# Plain vs chat-template edits of the bundled instruct model, each asked both ways: 200 edits of
# counterfact-edit.json (records 0-199, 2 batches of 100, bf16 + masters, preset smollm2-135m),
# edited plain (run "plain") and inside the chat template (run "chat"), every edited fact scored
# plain (ES, top-1 via the counterfact metric) and inside the template (--ask-chat). Resumable.
# Then: python benchmarks/chat26_report.py
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${CHAT_DIR:-$HOME/.cache/encore_fast/chat-26}
DATA=$(.venv/bin/encore-fast data path counterfact-edit)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
for RUN in plain chat; do
  FLAGS=()
  [ "$RUN" = chat ] && FLAGS=(--chat)
  RESUME=()
  [ -f "$OUT/$RUN/config.json" ] && RESUME=(--resume)
  .venv/bin/encore-fast eval --method encore --preset smollm2-135m --dtype bf16 \
    --dataset "$DATA" --num-edits 200 --batch-size 100 --eval-every 2 --eval-sampling edited \
    --eval-sample 200 --ask-chat --wikitext none --known-facts none --downstream none \
    --forgetting 0 --out "$OUT/$RUN" --no-plots --quiet "${FLAGS[@]}" "${RESUME[@]}"
done
