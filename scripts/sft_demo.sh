#!/usr/bin/env bash
# Fine-tuning on conversations in CPU minutes: config/sft-tiny.yaml over examples/conversations.jsonl
# (loss on the assistant's tokens only, conversations packed), then chat replies through the template.
# Everything lands in runs/sft-demo/; logs/samples.md shows the replies ending with <|im_end|>.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/sft-demo}
STEPS=${STEPS:-300}
if [ -e "$OUT" ]; then
  if grep -qs '"kind": "run"' "$OUT/.smollm2"; then
    echo "replacing the previous SFT demo run in $OUT"
    rm -rf "$OUT"
  else
    echo "error: $OUT exists and is not a smollm2 run: move it, or run with OUT=another/folder" >&2
    exit 2
  fi
fi
$PY train.py --config config/sft-tiny.yaml --train_steps "$STEPS" --out_dir "$OUT"
echo
echo "== chat replies of the fine-tuned model (greedy) =="
for question in "What is 12 plus 7?" "What is the opposite of early?" "Spell 'candle' backwards."; do
  echo "user: $question"
  printf 'assistant: '
  $PY -m smollm2 generate --chat --model "$OUT/final" --prompt "$question" --temperature 0 --max_new_tokens 40
done
echo
printf '%s\n/quit\n' "How many letters are in 'garden'?" | $PY -m smollm2 chat --model "$OUT/final" --temperature 0
