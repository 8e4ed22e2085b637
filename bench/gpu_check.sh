#!/usr/bin/env bash
# The CUDA fast path on one GPU, in under 5 minutes: attention kernel, bf16 vs fp32 losses,
# tokens/s + MFU + peak memory for both 135M presets at sequence length 2048.
#   bash bench/gpu_check.sh [--batch_size 8] [--steps 10]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python)}
# The repository root on the path: works after the seed's plain `pip install -r requirements.txt` too.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" bench/gpu_check.py "$@"
