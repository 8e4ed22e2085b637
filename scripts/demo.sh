#!/usr/bin/env bash
# The demo: the seed's two-phase story on config/tiny.yaml over input.txt, on a CPU in minutes.
# Phase 1 trains with predictions every 100 steps and a checkpoint at the end; phase 2 resumes it
# for 50 more steps. Everything lands in runs/demo/ (checkpoints/, logs/, final/).
# Nothing is ever deleted: when runs/demo already holds a run, the demo continues it for 50 more
# steps (train.py refuses a folder that holds another run, or anything it would damage).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/demo}
STEPS=${STEPS:-600}
MORE=${MORE:-50}

newest_step() {  # the highest N of $1/checkpoints/step_N.pt, or nothing
  local file n best=""
  for file in "$1"/checkpoints/step_*.pt; do
    n=${file##*/step_}
    n=${n%.pt}
    if [[ -f $file && $n =~ ^[0-9]+$ ]] && { [[ -z $best ]] || ((n > best)); }; then best=$n; fi
  done
  echo "$best"
}

step=$(newest_step "$OUT")
if [[ -z $step ]]; then
  $PY train.py --config config/tiny.yaml --train_steps "$STEPS" --out_dir "$OUT"
  step=$STEPS
else
  echo "$OUT already holds a run (step_$step.pt): continuing it (OUT=another/folder starts a new one)"
fi
$PY train.py --config config/tiny.yaml --train_steps "$MORE" --checkpoint_path "$OUT/checkpoints/step_$step.pt" --out_dir "$OUT"
echo
echo "== a sample from the resumed model (step $((step + MORE))) =="
$PY -m smollm2 generate --checkpoint "$OUT/checkpoints/step_$((step + MORE)).pt" --prompt "ROMEO:" \
  --max_new_tokens 120 --temperature 0.8 --top_k 50 --seed 1
