# Shared by demo.sh and sft_demo.sh (sourced): start a run in $OUT, or find the one already there.
# Nothing is ever deleted: a folder that already holds a run is continued, never replaced.

newest_step() {  # the highest N of $1/checkpoints/step_N.pt, or nothing
  local file n best=""
  for file in "$1"/checkpoints/step_*.pt; do
    n=${file##*/step_}
    n=${n%.pt}
    if [[ -f $file && $n =~ ^[0-9]+$ ]] && { [[ -z $best ]] || ((n > best)); }; then best=$n; fi
  done
  echo "$best"
}

start_or_find_run() {  # $1: the config. Sets $step to the run's newest step and $fresh to 1 if it just started.
  step=$(newest_step "$OUT")
  fresh=0
  if [[ -z $step ]]; then
    $PY train.py --config "$1" --train_steps "$STEPS" --out_dir "$OUT"
    step=$STEPS
    fresh=1
  else
    echo "$OUT already holds a run (step_$step.pt): continuing it (OUT=another/folder starts a new one)"
  fi
}

continue_run() {  # $1: the config. $MORE more steps from $step; then $step is the new newest step.
  $PY train.py --config "$1" --train_steps "$MORE" --checkpoint_path "$OUT/checkpoints/step_$step.pt" --out_dir "$OUT"
  step=$((step + MORE))
}
