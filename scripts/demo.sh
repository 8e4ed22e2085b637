#!/usr/bin/env bash
# The demo: the seed's two-phase story on config/tiny.yaml over input.txt, on a CPU in minutes.
# Phase 1 trains with predictions every 100 steps and a checkpoint at the end; phase 2 resumes it
# for 50 more steps. Everything lands in runs/demo/ (checkpoints/, logs/, final/).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/demo}
STEPS=${STEPS:-600}
# A run folder holds one run: a previous demo (marked by smollm2 as a run) is replaced, anything else refused.
if [ -e "$OUT" ]; then
  if grep -qs '"kind": "run"' "$OUT/.smollm2"; then
    echo "replacing the previous demo run in $OUT"
    rm -rf "$OUT"
  else
    echo "error: $OUT exists and is not a smollm2 run: move it, or run with OUT=another/folder" >&2
    exit 2
  fi
fi
$PY train.py --config config/tiny.yaml --train_steps "$STEPS" --out_dir "$OUT"
$PY train.py --config config/tiny.yaml --train_steps 50 --checkpoint_path "$OUT/checkpoints/step_$STEPS.pt" --out_dir "$OUT"
echo
echo "== a sample from the resumed model (step $((STEPS + 50))) =="
$PY -m smollm2 generate --checkpoint "$OUT/checkpoints/step_$((STEPS + 50)).pt" --prompt "ROMEO:" \
  --max_new_tokens 120 --temperature 0.8 --top_k 50 --seed 1
