# Quick start (see README.md): `make train` runs the main job, `make test` runs the tests.
# Both create .venv and install what they need into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train demo test install clean

$(STAMP): setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main job: GRPO on the built-in medvista-mini set with the tiny Qwen2.5-VL (CPU, minutes).
train: $(STAMP)
	$(BIN)/medvistagym train

# Sanity check of the environment: the scripted oracle and random policies.
demo: $(STAMP)
	$(BIN)/medvistagym eval --dataset medvista-mini --split test --policy oracle
	$(BIN)/medvistagym eval --dataset medvista-mini --split test --policy random

# The main suite, then the vLLM back ends against real vLLM (CPU build) in their own venv.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests --ignore=tests/policy/with_vllm
	bash .ci/vllm-tests

# The vLLM tests alone (.venv-vllm is created on first use).
.PHONY: test-vllm
test-vllm:
	bash .ci/vllm-tests

clean:
	rm -rf $(VENV) .venv-vllm .pytest_cache .hypothesis
