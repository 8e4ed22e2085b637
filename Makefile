# `make demo` and `make test` set everything up on a fresh machine (a local .venv), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo sft-demo test lint format bench bench-quick bench-gpu app

# The runtime (what the demo, the app and train.py need), then the tools of tests and benchmarks.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# llama-cpp-python (requirements-dev.txt) compiles llama.cpp for this machine's CPU (GGML_NATIVE), once
# per virtualenv: a wheel pip cached from an earlier build, perhaps on another CPU, is dropped first
# (it could use instructions this CPU lacks).
$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(PY) -m pip cache remove -q llama_cpp_python 2>/dev/null || true
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $(DEV_STAMP)

demo: $(STAMP)
	$(PY) -m smollm2 info --config config/tiny.yaml
	bash scripts/demo.sh

sft-demo: $(STAMP)
	bash scripts/sft_demo.sh

test: $(DEV_STAMP)
	$(PY) -m pytest -q

lint: $(DEV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(DEV_STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

app: $(STAMP)
	$(PY) app.py

# Every CPU section of BENCHMARKS.md (bench/results/*.md); bench-quick: fewer rounds, smaller inputs.
bench: $(DEV_STAMP)
	$(PY) bench/run.py

bench-quick: $(DEV_STAMP)
	$(PY) bench/run.py --quick

# On a CUDA machine: the GPU section (bench/results/gpu.md), the rest of BENCHMARKS.md kept.
bench-gpu: $(DEV_STAMP)
	$(PY) bench/run.py --only gpu
