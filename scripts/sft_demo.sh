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

source "$(dirname "$0")/run_lib.sh"
start_or_find_run config/sft-tiny.yaml
if ((fresh == 0)); then continue_run config/sft-tiny.yaml; fi
echo
echo "== chat replies of the fine-tuned model (greedy) =="
for question in "What is 12 plus 7?" "What is the opposite of early?" "Spell 'candle' backwards."; do
  echo "user: $question"
  printf 'assistant: '
  $PY -m smollm2 generate --chat --model "$OUT/final" --prompt "$question" --temperature 0 --max_new_tokens 40
done
echo
printf '%s\n/quit\n' "How many letters are in 'garden'?" | $PY -m smollm2 chat --model "$OUT/final" --temperature 0
