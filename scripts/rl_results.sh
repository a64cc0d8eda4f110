#!/usr/bin/env bash
# Reproduces the results of docs/rl.md: the embedded GRPO default (LoRA r8) on two seeds, the same
# run with a MoLE policy, and Dr. GRPO, each 40 steps (18 to 25 minutes a run on 2 CPU cores;
# rerunning skips finished runs). Then the per-10-steps table of every run.
# Usage: [SEEDS="0 1"] bash scripts/rl_results.sh [GROUP...]  (groups: lora mole dr_grpo; all by default)
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=runs/rl_results
SHOW="verifier_score|strict_match"
read -r -a SEEDS <<<"${SEEDS:-0 1}"
GROUPS_TO_RUN=("${@:-lora mole dr_grpo}")
mkdir -p "$OUT"
source "$(dirname "$0")/timed.sh"
DEFAULT="--config configs/rl/grpo_smollm2.yaml"

# fit NAME SEED ARGS...: one run in $OUT/NAME/s<SEED>
fit() {
  local name=$1 seed=$2
  shift 2
  timed "$name-s$seed" $PY -m lightning_moe fit $DEFAULT "$@" --seed_everything="$seed" \
    --trainer.logger.init_args.save_dir=$OUT --trainer.logger.init_args.name="$name" \
    --trainer.logger.init_args.version="s$seed"
}
wants() { [[ " ${GROUPS_TO_RUN[*]} " == *" $1 "* ]]; }

for seed in "${SEEDS[@]}"; do
  if wants lora; then fit lora "$seed"; fi
  if wants mole; then fit mole "$seed" --config configs/rl/mole_policy.yaml; fi
  if wants dr_grpo; then fit dr_grpo "$seed" --config configs/rl/dr_grpo.yaml; fi
done
for run in "$OUT"/*/s*; do
  echo "== $run"
  $PY scripts/rl_table.py "$run"
done
