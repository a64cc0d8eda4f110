#!/usr/bin/env bash
# Reproduces the data-conflict table in docs/multimodal.md: the align stage once, then plain LoRA,
# MoLE, and plain LoRA on twice the samples (batch 16 instead of 8, same steps), for two seeds,
# each scored per domain on the generated test split (50 questions per domain).
# Usage: bash scripts/multimodal_results.sh   (rerunning skips finished steps)
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=runs/multimodal  # where the instruct configs look for the align stage's projector
SHOW="test/accuracy|predictions written"
STEPS=${STEPS:-60}
mkdir -p "$OUT"
source "$(dirname "$0")/timed.sh"

timed align-fit $PY -m lightning_moe fit --config configs/multimodal/align_smollm2.yaml --trainer.max_steps=80
for seed in 0 1; do
  for run in lora mole lora2x; do
    config=configs/multimodal/${run%2x}_smollm2.yaml
    batch=8
    if [ "$run" = lora2x ]; then batch=16; fi
    logger="--trainer.logger.init_args.name=$run --trainer.logger.init_args.version=seed$seed"
    timed "$run-seed$seed-fit" $PY -m lightning_moe fit --config "$config" $logger --seed_everything=$seed \
      --trainer.max_steps="$STEPS" --data.init_args.batch_size=$batch
    timed "$run-seed$seed-test" $PY -m lightning_moe test --config "$config" \
      --trainer.logger.init_args.name=$run --trainer.logger.init_args.version=seed$seed-test \
      --model.init_args.adapter_path="$OUT/$run/seed$seed/adapter"
  done
done

echo "== per-domain accuracy (%), mean over seeds (each seed)"
rows=()
for run in lora mole lora2x; do rows+=("$run=$OUT/$run/seed0-test,$OUT/$run/seed1-test"); done
$PY scripts/test_metrics_table.py "${rows[@]}"
echo "== MoLE: share of each domain's routed tokens per expert (%), seed 0"
$PY scripts/test_metrics_table.py --prefix test/expert_share/ "mole=$OUT/mole/seed0-test"
