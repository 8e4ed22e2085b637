#!/usr/bin/env bash
# The CUDA fast path on one GPU: attention kernel, bf16 vs fp32 losses, document masks (dense and
# flex), tokens/s + MFU + peak memory for the family's presets at sequence length 2048, and with
# --seed_steps N the seed's own train.py command. `make bench-gpu` runs it into BENCHMARKS.md.
#   bash bench/gpu_check.sh [--batch_size 8] [--steps 10]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python)}
# The repository root on the path: works after the seed's plain `pip install -r requirements.txt` too.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" bench/gpu_check.py "$@"
