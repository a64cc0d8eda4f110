#!/usr/bin/env bash
# Reproduces the canvas composition tables in docs/diffusion.md: the canvas base UNet, the slot
# judge, three canvas concept LoRAs (digit, textile, framed); each LoRA alone (and the base) on
# its own concept; then every prompt set (three 2-concept sets and the 3-concept set) sampled with
# every method (base alone, merge, switch, composite, CLoRA, LoRA-Composer with and without its
# isolation), judged, and tabulated; then CLoRA and LoRA-Composer with a part left out in turn.
# Usage: bash scripts/canvas_results.sh
#   (about an hour on 2 CPU cores with the base to train; finished steps are kept)
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=runs/canvas_results  # logs; models go where the configs write them
SHOW="predictions written|val/"
mkdir -p "$OUT"
source "$(dirname "$0")/timed.sh"
D=configs/diffusion
LORAS=runs/diffusion/canvas/loras

train canvas-base runs/diffusion/canvas/base/unet $D/canvas_base.yaml
train canvas-judge runs/judges/canvas_judge configs/judges/canvas_judge.yaml
# a second judge (other seeds), to see how much the verdicts on generated canvases depend on it
if [ ! -e runs/judges/canvas_judge_seed1 ]; then
  timed canvas-judge-seed1 $PY -m lightning_moe fit --config configs/judges/canvas_judge.yaml --seed_everything=1 \
    --model.init_args.model_seed=1 --data.init_args.seed=1 --trainer.logger.init_args.name=canvas_judge_seed1_training \
    --trainer.callbacks.init_args.dirpath=runs/judges/canvas_judge_seed1
fi
for lora in digit textile framed; do train "canvas-lora-$lora" $LORAS/$lora $D/lora_canvas_$lora.yaml; done

# one concept at a time: each LoRA alone, and the base, on prompts of that LoRA's concept
SINGLE="--config $D/compose_canvas_three.yaml --model.init_args.adapters=[] --model.init_args.composition=null"
declare -A PROMPTS=([digit]="[handwritten digit]|[]" [textile]="[textile swatch]|[]" [framed]="[]|[framed]")
for lora in digit textile framed; do
  IFS="|" read -r objects styles <<<"${PROMPTS[$lora]}"
  for model in "$lora" "base_$lora"; do
    adapter=$([ "$model" = "$lora" ] && echo "--model.init_args.adapter_path=$LORAS/$lora" || true)
    # shellcheck disable=SC2086  # the option strings split into words on purpose
    timed "single-$model" $PY -m lightning_moe predict $SINGLE $adapter "--data.init_args.objects=$objects" \
      --data.init_args.styles=$styles --trainer.logger.init_args.name=single --trainer.logger.init_args.version=$model
  done
done

declare -A CONCEPTS=(
  [three]='"handwritten digit", "textile swatch", "framed"'
  [digit_textile]='"handwritten digit", "textile swatch"'
  [digit_framed]='"handwritten digit", "framed"'
  [textile_framed]='"textile swatch", "framed"'
)
composition() {  # composition CLASS INIT_ARGS: the --model.init_args.composition option
  echo "--model.init_args.composition={\"class_path\": \"lightning_moe.tasks.diffusion.$1\", \"init_args\": {$2}}"
}
for set in three digit_textile digit_framed textile_framed; do
  overlay=()
  [ "$set" = three ] || overlay=(--config "$D/compose_canvas_$set.yaml")
  concepts="\"concepts\": [${CONCEPTS[$set]}]"
  count=$(($(tr -cd ',' <<<"${CONCEPTS[$set]}" | wc -c) + 1))
  zeros=$(printf '0.0, %.0s' $(seq 2 "$count"))0.0
  declare -A METHOD=(
    [base]=$(composition Merge "\"weights\": [$zeros]")
    [merge]=$(composition Merge "")
    [switch]=$(composition Switch "\"every\": 2")
    [composite]=$(composition Composite "")
    [clora]=$(composition CLoRA "$concepts")
    [lora_composer]=$(composition LoRAComposer "$concepts")
    [lora_composer_no_isolation]=$(composition LoRAComposer "$concepts, \"isolate\": false")
  )
  for method in base merge switch composite clora lora_composer lora_composer_no_isolation; do
    timed "$set-$method" $PY -m lightning_moe predict --config $D/compose_canvas_three.yaml "${overlay[@]}" \
      "${METHOD[$method]}" --trainer.logger.init_args.name=$set --trainer.logger.init_args.version=$method
  done
done
# which part of each method does the work, on digit + textile
concepts='"concepts": ["handwritten digit", "textile swatch"]'
declare -A PART=(
  [clora_no_guidance]=$(composition CLoRA "$concepts, \"guidance_steps\": 0")
  [lora_composer_no_guidance]=$(composition LoRAComposer "$concepts, \"guidance_steps\": 0")
  [lora_composer_no_reinitialisation]=$(composition LoRAComposer "$concepts, \"reinitialise\": false")
)
for part in clora_no_guidance lora_composer_no_guidance lora_composer_no_reinitialisation; do
  timed "digit_textile-$part" $PY -m lightning_moe predict --config $D/compose_canvas_three.yaml \
    --config $D/compose_canvas_digit_textile.yaml "${PART[$part]}" \
    --trainer.logger.init_args.name=digit_textile --trainer.logger.init_args.version=$part
done
# the size of LoRA-Composer's latent steps (0.5 above), without the isolation, on digit + textile
for step in 0.1 0.25 1.0; do
  timed "digit_textile-lora_composer_no_isolation_step_$step" $PY -m lightning_moe predict \
    --config $D/compose_canvas_three.yaml --config $D/compose_canvas_digit_textile.yaml \
    "$(composition LoRAComposer "$concepts, \"isolate\": false, \"step_size\": $step")" \
    --trainer.logger.init_args.name=digit_textile --trainer.logger.init_args.version=lora_composer_no_isolation_step_$step
done
$PY scripts/canvas_table.py --second-judge runs/judges/canvas_judge_seed1 --figures docs/images
