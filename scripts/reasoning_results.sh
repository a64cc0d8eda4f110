#!/usr/bin/env bash
# Reproduces the table in docs/reasoning.md: the base model, then LoRA, MoLE and MixLoRA trained
# for the same steps on the same problems (same tokens), each scored on the fixed test set
# (250 gsm_symbolic problems, seeds 1_000_000..1_000_249) in a fresh process from its saved adapter.
# Usage: bash scripts/reasoning_results.sh   (about 90 minutes on 2 CPU cores; rerunning skips finished steps)
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/reasoning_results}
SHOW="test/(strict|flexible)_match|test/loss "
mkdir -p "$OUT"
source "$(dirname "$0")/timed.sh"

logger() { echo "--trainer.logger.init_args.save_dir=$OUT --trainer.logger.init_args.version=$1"; }

# Fresh LoRA adapters are exact zero deltas (B = 0), so testing them scores the base model.
timed base-test $PY -m lightning_moe test --config configs/reasoning/lora_smollm2.yaml $(logger base)
for kind in lora mole mixlora; do
  config=configs/reasoning/${kind}_smollm2.yaml
  # validation is skipped here: the table reports the test set only
  timed "$kind-fit" $PY -m lightning_moe fit --config "$config" $(logger fit) --trainer.limit_val_batches=0
  timed "$kind-test" $PY -m lightning_moe test --config "$config" $(logger test) \
    --model.init_args.adapter_path="$OUT/${kind}_smollm2/fit/adapter"
done
