#!/usr/bin/env bash
# Here (no GPU needed): put what a GPU session's run needs beside the tree, in gpu_carry/
# (git-ignored), since the device machine gets the repository only. Then, with the `device`
# tool: run command "bash scripts/gpu_session.sh" with carry ["gpu_carry"].
set -euo pipefail
cd "$(dirname "$0")/.."
data="${ENCORE_FAST_DATA:-../shared/data}"
rm -rf gpu_carry && mkdir -p gpu_carry/data/counterfact gpu_carry/tokenizer
cp "$data/counterfact/counterfact-edit.json" gpu_carry/data/counterfact/
.venv/bin/python - <<'PY'
from transformers import AutoTokenizer
from encore_fast.models import bundled_model_dir
AutoTokenizer.from_pretrained(bundled_model_dir()).save_pretrained("gpu_carry/tokenizer")
PY
du -sh gpu_carry
