#!/usr/bin/env bash
# Reproduces the tables in docs/diffusion.md: the embedded base UNet, the concept judge, three
# concept LoRAs (digit, inverted, framed) and a gate over them; each alone on its own concept;
# then every prompt set (three 2-concept sets and the 3-concept set) sampled with every method
# (base alone, merge, switch, composite, learned gate), judged, and tabulated.
# Usage: bash scripts/diffusion_results.sh
#   (about 90 minutes on 2 CPU cores with the base to train, 45 without; finished steps are kept)
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=runs/diffusion_results  # logs; models go where the configs write them
SHOW="predictions written|val/"
mkdir -p "$OUT"
source "$(dirname "$0")/timed.sh"
D=configs/diffusion

train base runs/diffusion/base/unet $D/base_fashion.yaml
train judge runs/judges/concept_judge configs/judges/concept_judge.yaml
for lora in digit inverted framed; do train "lora-$lora" runs/diffusion/loras/$lora $D/lora_$lora.yaml; done
train gate runs/diffusion/gate $D/gate_concepts.yaml

# one concept at a time: the base on its own prompts ("a sneaker"), and each LoRA alone on its
# concept's prompts ("a handwritten digit 3", "a sneaker, inverted", "a sneaker, framed")
SINGLE="--config $D/compose_three.yaml --model.init_args.composition=null --trainer.logger.init_args.name=single"
declare -A PROMPTS=([base]="fashion-mnist []" [digit]="mnist-5k []" [inverted]="fashion-mnist [inverted]" [framed]="fashion-mnist [framed]")
for model in base digit inverted framed; do
  read -r source styles <<<"${PROMPTS[$model]}"
  adapters=$([ "$model" = base ] || echo "--model.init_args.adapter_path=runs/diffusion/loras/$model")
  # shellcheck disable=SC2086
  timed "single-$model" $PY -m lightning_moe predict $SINGLE --model.init_args.adapters=[] $adapters \
    --data.init_args.source=$source --data.init_args.styles=$styles --trainer.logger.init_args.version=$model
done

declare -A METHOD=(
  [base]="--config $D/compose_base.yaml"
  [merge]=""
  [switch]="--model.init_args.composition=lightning_moe.tasks.diffusion.Switch --model.init_args.composition.every=2"
  [composite]="--model.init_args.composition=lightning_moe.tasks.diffusion.Composite"
  [gate]="--config $D/compose_gate.yaml"
)
for set in three digit_inverted digit_framed inverted_framed; do
  overlay=$([ "$set" = three ] || echo "--config $D/compose_$set.yaml")
  for method in base merge switch composite gate; do
    # shellcheck disable=SC2086  # the option strings split into words on purpose
    timed "$set-$method" $PY -m lightning_moe predict --config $D/compose_three.yaml $overlay \
      ${METHOD[$method]} --trainer.logger.init_args.name=$set --trainer.logger.init_args.version=$method
  done
done
$PY scripts/concept_table.py
