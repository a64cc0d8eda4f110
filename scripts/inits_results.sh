#!/usr/bin/env bash
# Reproduces the tables in docs/inits.md: plain LoRA on the demo's budget (SmolLM2-135M-Instruct,
# chain_sum + letter_counting, 24 steps of 8 problems, 64 validation problems) with each init and
# each optimiser; MoLE with kaiming and EVA experts; DyLoRA against separately trained ranks; intruder
# dimensions of LoRA r8, rsLoRA r64 and full fine-tuning. Two seeds of everything (SEEDS="0 1").
# Usage: [SEEDS="1"] bash scripts/inits_results.sh [GROUP...]  (groups: inits optimisers mole dylora
#   intruders; all by default; about 4 minutes per run on 2 CPU cores; rerunning skips finished runs)
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=runs/inits
SHOW="data-driven init|val/strict_match|val/loss "
read -r -a SEEDS <<<"${SEEDS:-0 1}"
GROUPS_TO_RUN=("${@:-inits optimisers mole dylora intruders}")
mkdir -p "$OUT"
source "$(dirname "$0")/timed.sh"
# the base model's scores (the demo's "before") are the same for every variant: measured once, by
# the DyLoRA run, whose config keeps BeforeAfterTable; the other runs only train, export and
# score after training (about 40 s less each)
AFTER_ONLY='--trainer.callbacks=[{"class_path":"lightning_moe.callbacks.ExportAdapter"}]'
LORA="--config configs/reasoning/lora_smollm2.yaml --config configs/reasoning/demo.yaml $AFTER_ONLY"
MOLE="--config configs/reasoning/mole_smollm2.yaml --config configs/reasoning/demo.yaml $AFTER_ONLY"


for seed in "${SEEDS[@]}"; do
  if wants inits; then
    fit kaiming "$seed" $LORA
    for init in pissa eva lora_ga; do fit "$init" "$seed" $LORA --config configs/inits/$init.yaml; done
  fi
  if wants optimisers; then  # AdamW is the kaiming run above
    for optimiser in lora_pro allora; do fit "$optimiser" "$seed" $LORA --config configs/inits/$optimiser.yaml; done
    [ "$seed" != 0 ] || fit lora_pro_lr1e-3 0 $LORA --config configs/inits/lora_pro.yaml --model.init_args.optimizer.init_args.lr=0.001
  fi
  if wants mole; then
    fit mole_kaiming "$seed" $MOLE
    fit mole_eva "$seed" $MOLE --config configs/inits/mole_eva.yaml
  fi
  if wants dylora || wants intruders; then fit kaiming "$seed" $LORA; fi  # LoRA r8 of both groups
  if wants dylora; then  # one DyLoRA training against LoRAs trained at each rank alone
    fit dylora "$seed" $LORA --config configs/inits/dylora.yaml
    for rank in 1 2 4 8; do
      timed "dylora-s$seed-r$rank-truncate" $PY -m lightning_moe truncate $OUT/dylora/s$seed/adapter --rank $rank \
        --output $OUT/dylora_r$rank/s$seed/adapter
      timed "dylora-s$seed-r$rank-validate" $PY -m lightning_moe validate $LORA \
        --model.init_args.adapter_path=$OUT/dylora_r$rank/s$seed/adapter \
        --trainer.logger.init_args.save_dir=$OUT --trainer.logger.init_args.name=dylora_r$rank \
        --trainer.logger.init_args.version=s$seed
      [ $rank = 2 ] || [ $rank = 4 ] || continue  # trained alone: ranks 2 and 4 (8 is the kaiming run)
      fit "lora_r$rank" "$seed" $LORA "--model.init_args.adapters=[{targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj], adapter: {kind: lora, rank: $rank, alpha: 16}}]"
    done
  fi
  if wants intruders; then
    fit rslora_r64 "$seed" $LORA --config configs/inits/rslora_r64.yaml
    fit full_finetune "$seed" $LORA --config configs/inits/full_finetune.yaml
    for run in kaiming rslora_r64 full_finetune; do
      timed "intruders-$run-s$seed" $PY -m lightning_moe inspect intruders $OUT/$run/s$seed/adapter \
        --output $OUT/intruders_$run-s$seed.md --logdir $OUT/intruders/$run-s$seed
    done
  fi
done
$PY scripts/inits_table.py $OUT
