#!/usr/bin/env bash
# On the device machine (its python3 has torch, triton, transformers, pytest-benchmark):
# everything a GPU session checks and records -- the kernels' tests (bf16 and CUDA cases run
# there), the kernel benchmarks at Llama3-8B shapes, and reference vs fast engine on a random
# Llama3-8B-shaped bf16 model. Results land in $OUT (the device tool brings them back) or in
# gpu_out/. Prepare first with scripts/gpu_prepare.sh. SYNTHETIC=tiny for a quick dry run.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 ENCORE_FAST_DATA="${ENCORE_FAST_DATA:-$PWD/gpu_carry/data}"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 \
    || { cat "$out/install.log"; exit 1; }
python3 - <<'PY' | tee "$out/device.txt"
import torch, triton, transformers
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"{name}; torch {torch.__version__}; triton {triton.__version__}; "
      f"transformers {transformers.__version__}")
PY
status=0
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernels_compile.py \
    2>&1 | tee "$out/kernel_tests.log" || status=1
python3 benchmarks/bench_kernels.py --out "$out/kernels.csv" 2>&1 | tee "$out/bench_kernels.log" \
    || status=1
python3 benchmarks/bench_engines.py --synthetic "${SYNTHETIC:-llama3-8b}" --n "${EDITS:-50}" \
    --batch-size 50 --tokenizer gpu_carry/tokenizer --out "$out/engines.csv" \
    2>&1 | tee "$out/bench_engines.log" || status=1
exit $status
