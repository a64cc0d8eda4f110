#!/usr/bin/env bash
# Reproduces the tables in docs/memory.md: the demo's budget (SmolLM2-135M-Instruct, chain_sum +
# letter_counting, 24 steps of 8 problems, 64 validation problems) with LoRA and MoLE on the fp32
# base, on the NF4 base, with LQ-LoRA, with L4Q (quantisation-aware, then merged and quantised)
# and with LoRAM (trained on a pruned base, recovered to the full one).
# Usage: [SEEDS="0"] bash scripts/memory_results.sh [GROUP...]  (groups: nf4 embeddings lq l4q loram; all by
#   default; 1.5-3 minutes per run on 2 CPU cores when nothing else runs, more for the LQ-LoRA
#   splits (about 10 min) and NF4 embeddings (about 15 min); rerunning skips finished runs)
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=runs/memory
SHOW="quantized|LQ-LoRA split|pruned|val/strict_match|val/loss "
read -r -a SEEDS <<<"${SEEDS:-0 1}"
GROUPS_TO_RUN=("${@:-nf4 embeddings lq l4q loram}")
mkdir -p "$OUT"
source "$(dirname "$0")/timed.sh"
LORA="--config configs/reasoning/lora_smollm2.yaml --config configs/reasoning/demo.yaml"
MOLE="--config configs/reasoning/mole_smollm2.yaml --config configs/reasoning/demo.yaml"


for seed in "${SEEDS[@]}"; do
  if wants nf4; then
    fit lora_fp32 "$seed" $LORA
    fit lora_nf4 "$seed" $LORA --config configs/memory/nf4_lora.yaml
    fit mole_fp32 "$seed" $MOLE
    fit mole_nf4 "$seed" $MOLE --config configs/memory/nf4_mole.yaml
  fi
  if wants embeddings; then fit nf4_embeddings "$seed" $LORA --config configs/memory/nf4_embeddings.yaml; fi
  if wants lq; then
    fit lq_lora "$seed" $LORA --config configs/memory/lq_lora.yaml
    fit lq_mole "$seed" $MOLE --config configs/memory/lq_mole.yaml
    # does a smaller step help a start from non-zero factors, as PiSSA's did not? (one seed)
    [ "$seed" != 0 ] || fit lq_lora_lr3e-4 0 $LORA --config configs/memory/lq_lora.yaml \
      --model.init_args.optimizer.init_args.lr=0.0003
  fi
  if wants l4q; then  # trained quantisation-aware, then the merged quantised model from its codes
    fit l4q "$seed" $LORA --config configs/memory/l4q.yaml
    timed "l4q-s$seed-export" $PY -m lightning_moe export-quantized $OUT/l4q/s$seed/adapter \
      --output $OUT/l4q/s$seed/quantized --compare --overwrite
  fi
  if wants loram; then  # trained on the pruned base (its own validation), then the full model
    for run in "loram_50 $LORA" "loram_50_calibration $LORA" "loram_30 $LORA" "mole_loram_50 $MOLE"; do
      read -r name configs <<<"$run"
      config=${name#mole_}
      extra=()
      if [[ $name == *_calibration ]]; then extra=(--model.init_args.prune.method=calibration); fi
      fit "$name" "$seed" $configs --config "configs/memory/${config%_calibration}.yaml" "${extra[@]}"
      timed "$name-s$seed-full" $PY -m lightning_moe validate $configs \
        --model.init_args.adapter_path=$OUT/$name/s$seed/adapter \
        --trainer.logger.init_args.save_dir=$OUT --trainer.logger.init_args.name="${name}_full" \
        --trainer.logger.init_args.version="s$seed"
    done
  fi
done
$PY scripts/memory_table.py $OUT
