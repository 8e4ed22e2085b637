#!/usr/bin/env bash
# The demo: the seed's two-phase story on config/tiny.yaml over input.txt, on a CPU in minutes.
# Phase 1 trains with predictions every 100 steps and a checkpoint at the end; phase 2 resumes it
# for 50 more steps, and the last line is its bits per byte on its held-out split (`eval --split val`).
# Everything lands in runs/demo/ (checkpoints/, logs/, final/).
# Nothing is ever deleted: when runs/demo already holds a run, the demo continues it for 50 more
# steps (train.py refuses a folder that holds another run, or anything it would damage).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/demo}
STEPS=${STEPS:-600}
MORE=${MORE:-50}

source "$(dirname "$0")/run_lib.sh"
start_or_find_run config/tiny.yaml
continue_run config/tiny.yaml  # the seed's second phase: resume for $MORE steps
echo
echo "== a sample from the resumed model (step $step) =="
$PY -m smollm2 generate --checkpoint "$OUT/checkpoints/step_$step.pt" --prompt "ROMEO:" \
  --max_new_tokens 120 --temperature 0.8 --top_k 50 --seed 1
echo
echo "== held-out bits per byte: the run's own validation split, scored at step $step =="
# Scored in windows of the length the run trains on (--split val's default: data.seq_len, 128 in tiny.yaml),
# not its context (512): it never learned the positions past 128, and windows of 512 would measure that.
$PY -m smollm2 eval --checkpoint "$OUT/checkpoints/step_$step.pt" --split val --precision fp32
