# The two commands of the README: `make train` and `make test`. Both create .venv when it is missing.
VENV ?= .venv
ARGS ?=
PYTEST_ARGS ?=
# The environment's own tools first, as an activated venv has them: torch compiles DeepSpeed's CPU op with the first
# `ninja` on PATH, and a build by another ninja version (the system's) is thrown away and redone (~40 s).
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: train test install bench

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)

install: $(VENV)/.installed

train: $(VENV)/.installed
	$(VENV)/bin/asyppo train $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check --quiet .
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/bench_logprobs.py
	$(VENV)/bin/python benchmarks/bench_weight_sync.py
	$(VENV)/bin/python benchmarks/bench_rollout.py
	$(VENV)/bin/python benchmarks/bench_rollout.py --task arithmetic
	$(VENV)/bin/python benchmarks/bench_steps.py
	$(VENV)/bin/python benchmarks/bench_trl.py
	$(VENV)/bin/python benchmarks/bench_trl.py --task chain
	$(VENV)/bin/python benchmarks/bench_weight_sync.py --sizes smollm2 --output benchmarks/results/weight_sync_smollm2.json
	$(VENV)/bin/python benchmarks/bench_rollout.py --task words --prompts 8 --samples 4 --repeats 5 --output benchmarks/results/rollout_words.json
	$(VENV)/bin/python benchmarks/role_memory.py
