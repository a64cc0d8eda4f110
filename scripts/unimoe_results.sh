#!/usr/bin/env bash
# The [unimoe] comparison in docs/multimodal.md, on the five-domain mix (the four image domains and
# the text-only arithmetic domain): the connector once, then per seed plain LoRA, LoRA on twice the
# samples, MoLE, and Uni-MoE's chain (image LoRA on the image domains, text LoRA on arithmetic,
# then the unified MoE upcycled from them), each scored per domain on the test split.
# Usage: SEEDS="0 1" STEPS=60 bash scripts/unimoe_results.sh   (rerunning skips finished steps)
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=runs/multimodal  # where the configs look for the connector's projector
SHOW="test/accuracy|test/domain_expert_mi|predictions written"
STEPS=${STEPS:-60}
SEEDS=${SEEDS:-0 1}
MIX="--data.init_args.domains=[fashion, digits, textile, grid, arithmetic]"
mkdir -p "$OUT"
source "$(dirname "$0")/timed.sh"

timed align-fit $PY -m lightning_moe fit --config configs/multimodal/align_smollm2.yaml --trainer.max_steps=80
for seed in $SEEDS; do
  fit_and_test mix-lora "$seed" configs/multimodal/lora_smollm2.yaml "$MIX" --trainer.max_steps="$STEPS"
  fit_and_test mix-mole "$seed" configs/multimodal/mole_smollm2.yaml "$MIX" --trainer.max_steps="$STEPS"
  # stage 2: each modality's LoRA on its own data; stage 3 reads this seed's folders
  fit_and_test unimoe-image "$seed" configs/multimodal/unimoe_image_experts.yaml --trainer.max_steps="$STEPS"
  fit_and_test unimoe-text "$seed" configs/multimodal/unimoe_text_experts.yaml --trainer.max_steps=$((STEPS / 2))
  staged=$OUT/unimoe_smollm2_seed$seed.yaml
  sed -e "s#runs/multimodal/unimoe_image_experts/fit/adapter#$OUT/unimoe-image/seed$seed/adapter#g" \
    -e "s#runs/multimodal/unimoe_text_experts/fit/adapter#$OUT/unimoe-text/seed$seed/adapter#g" \
    configs/multimodal/unimoe_smollm2.yaml >"$staged"
  fit_and_test unimoe "$seed" "$staged" --trainer.max_steps="$STEPS"
  fit_and_test mix-lora2x "$seed" configs/multimodal/lora_smollm2.yaml "$MIX" --trainer.max_steps="$STEPS" \
    --data.init_args.batch_size=16
done

tests() { local dirs=(); for seed in $SEEDS; do dirs+=("$OUT/$1/seed$seed-test"); done; (IFS=,; echo "${dirs[*]}"); }
echo "== per-domain accuracy (%), mean over seeds (each seed)"
$PY scripts/test_metrics_table.py "lora=$(tests mix-lora)" "lora2x=$(tests mix-lora2x)" \
  "mole=$(tests mix-mole)" "unimoe=$(tests unimoe)"
echo "== mutual information between domain and expert (bits; mean and best layer)"
$PY scripts/test_metrics_table.py --no-mean --scale 1 --prefix test/domain_expert_mi/ "mole=$(tests mix-mole)" "unimoe=$(tests unimoe)"
echo "== share of each domain's routed tokens per expert (%), first seed"
first=${SEEDS%% *}
$PY scripts/test_metrics_table.py --prefix test/expert_share/ "mole=$OUT/mix-mole/seed$first-test" \
  "unimoe=$OUT/unimoe/seed$first-test"
echo "== share of each modality's routed tokens per expert (%), first seed"
$PY scripts/test_metrics_table.py --prefix test/modality_expert_share/ "mole=$OUT/mix-mole/seed$first-test" \
  "unimoe=$OUT/unimoe/seed$first-test"
echo "== mutual information per layer and block, all domains and the image domains only"
for run in mix-mole unimoe; do
  for seed in $SEEDS; do $PY scripts/routing_information.py "$OUT/$run/seed$seed-test" --among fashion digits textile grid; done
done
echo "== trivial baselines"
$PY scripts/multimodal_baselines.py
