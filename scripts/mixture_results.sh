#!/usr/bin/env bash
# Reproduces the tables in docs/mixtures.md: four expert LoRAs, each trained on one reasoning-gym
# task, then mixtures of all four (uniform merge, X-LoRA, MeteoRA), every model scored on the
# same mixed test set (50 problems per task) by greedy generation, plus the gates' routing.
# Usage: bash scripts/mixture_results.sh   (about 40 minutes on 2 CPU cores; rerunning skips finished steps)
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=runs/mixture_results  # where the mixture configs look for the experts
SHOW="predictions written"
TASKS=(chain_sum letter_counting count_bits leg_counting)
mkdir -p "$OUT"
source "$(dirname "$0")/timed.sh"

# save_dir/name/version puts each run in $OUT/<name>/<version>
run() {
  local name=$1 version=$2
  shift 2
  echo "--trainer.logger.init_args.save_dir=$OUT --trainer.logger.init_args.name=$name --trainer.logger.init_args.version=$version $*"
}

EXPERT=configs/mixtures/expert_lora_smollm2.yaml
for task in "${TASKS[@]}"; do
  timed "expert-$task-fit" $PY -m lightning_moe fit --config $EXPERT $(run experts "$task") "--data.init_args.tasks=[$task]"
  timed "expert-$task-predict" $PY -m lightning_moe predict --config $EXPERT $(run predict "expert-$task") \
    --model.init_args.adapter_path="$OUT/experts/$task/adapter"
done
# Fresh LoRA adapters are exact zero deltas (B = 0), so this scores the base model.
timed base-predict $PY -m lightning_moe predict --config $EXPERT $(run predict base)
timed merged-predict $PY -m lightning_moe predict --config configs/mixtures/xlora_smollm2.yaml \
  --config configs/mixtures/merged_average.yaml $(run predict merged_average)
for kind in xlora meteora; do
  config=configs/mixtures/${kind}_smollm2.yaml
  timed "$kind-fit" $PY -m lightning_moe fit --config "$config" $(run "$kind" fit)
  timed "$kind-predict" $PY -m lightning_moe predict --config "$config" $(run predict "$kind") \
    --model.init_args.adapter_path="$OUT/$kind/fit/adapter"
done

rows=(base=base)
for task in "${TASKS[@]}"; do rows+=("$task expert=expert-$task"); done
rows+=("merged average=merged_average" "X-LoRA=xlora" "MeteoRA=meteora")
args=()
for row in "${rows[@]}"; do args+=("${row%%=*}=$OUT/predict/${row#*=}/predictions.jsonl"); done
echo "== strict match (%), 50 problems per task"
$PY scripts/prediction_table.py "${args[@]}"
for kind in xlora meteora; do
  echo "== $kind: mean gate probability (%) per task and expert"
  $PY scripts/mixture_routing.py configs/mixtures/${kind}_smollm2.yaml "$OUT/$kind/fit/adapter"
done
