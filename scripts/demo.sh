#!/usr/bin/env bash
# The demo: the parameter breakdown of every preset (training arrives with the trainer).
set -euo pipefail
PY=${PY:-.venv/bin/python}
for config in config/model_config.yaml config/smollm2-135m.yaml; do
  $PY -m smollm2 info --config "$config" | tail -1
done
