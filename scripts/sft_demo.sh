#!/usr/bin/env bash
# Fine-tuning on conversations in CPU minutes: config/sft-tiny.yaml over examples/conversations.jsonl
# (loss on the assistant's tokens only, conversations packed), then chat replies through the template.
# Everything lands in runs/sft-demo/; logs/samples.md shows the replies ending with <|im_end|>.
# Nothing is ever deleted: when runs/sft-demo already holds a run, the demo continues it for 50 more
# steps (train.py refuses a folder that holds another run, or anything it would damage).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/sft-demo}
STEPS=${STEPS:-300}
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
  $PY train.py --config config/sft-tiny.yaml --train_steps "$STEPS" --out_dir "$OUT"
else
  echo "$OUT already holds a run (step_$step.pt): continuing it (OUT=another/folder starts a new one)"
  $PY train.py --config config/sft-tiny.yaml --train_steps "$MORE" --checkpoint_path "$OUT/checkpoints/step_$step.pt" \
    --out_dir "$OUT"
fi
echo
echo "== chat replies of the fine-tuned model (greedy) =="
for question in "What is 12 plus 7?" "What is the opposite of early?" "Spell 'candle' backwards."; do
  echo "user: $question"
  printf 'assistant: '
  $PY -m smollm2 generate --chat --model "$OUT/final" --prompt "$question" --temperature 0 --max_new_tokens 40
done
echo
printf '%s\n/quit\n' "How many letters are in 'garden'?" | $PY -m smollm2 chat --model "$OUT/final" --temperature 0
