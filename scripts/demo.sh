#!/usr/bin/env bash
# Set up (if needed) and run the demo: edit facts in the bundled SmolLM2-135M, before/after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/encore-fast demo "$@"
