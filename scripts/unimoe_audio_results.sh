#!/usr/bin/env bash
# The audio part of [unimoe] in docs/multimodal.md. Stage 0 trains the audio encoder (spoken-digit
# classifier, held-out voices). Per seed: the audio connector, the audio LoRA on the spoken digits,
# and unified tuning on the six-domain mix (the five of scripts/unimoe_results.sh plus spoken) with
# image, text and audio experts, upcycled from that seed's stage-2 LoRAs; plain LoRA on the same
# mix as the baseline. Every model is scored per domain on the test split.
# Run scripts/unimoe_results.sh first: its image and text stages (in STAGES) seed the experts.
# Usage: SEEDS="0" STEPS=160 bash scripts/unimoe_audio_results.sh   (rerunning skips finished steps;
# BASELINE=0 leaves out the LoRA baseline; UNIFIED_STEPS sets the six-domain runs' steps, default STEPS)
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=runs/multimodal  # where the configs look for the audio encoder and the image connector
STAGES=${STAGES:-$OUT}
SHOW="test/accuracy|predictions written"
STEPS=${STEPS:-160}
SEEDS=${SEEDS:-0}
BASELINE=${BASELINE:-1}
UNIFIED_STEPS=${UNIFIED_STEPS:-$STEPS}
SIX="--data.init_args.domains=[fashion, digits, textile, grid, arithmetic, spoken]"
AUDIO_DATA=(--data.init_args.audio_token="<empty_output>" --data.init_args.audio_tokens=8)
source "$(dirname "$0")/timed.sh"

timed audio-encoder-fit $PY -m lightning_moe fit --config configs/multimodal/audio_encoder.yaml
for seed in $SEEDS; do
  aligned=$OUT/unimoe-audio-align/seed$seed/adapter
  timed "unimoe-audio-align-seed$seed-fit" $PY -m lightning_moe fit \
    --config configs/multimodal/unimoe_audio_align.yaml --seed_everything="$seed" \
    --trainer.logger.init_args.name=unimoe-audio-align --trainer.logger.init_args.version="seed$seed"
  fit_and_test unimoe-audio "$seed" configs/multimodal/unimoe_audio_experts.yaml --trainer.max_steps=$((STEPS / 2)) \
    --model.init_args.projector_path="$aligned/projector.safetensors" \
    --model.init_args.audio_projector_path="$aligned/audio_projector.safetensors"
  staged=$OUT/unimoe_audio_smollm2_seed$seed.yaml
  sed -e "s#runs/multimodal/unimoe_image_experts/fit/adapter#$STAGES/unimoe-image/seed$seed/adapter#g" \
    -e "s#runs/multimodal/unimoe_text_experts/fit/adapter#$STAGES/unimoe-text/seed$seed/adapter#g" \
    -e "s#runs/multimodal/unimoe_audio_experts/fit/adapter#$OUT/unimoe-audio/seed$seed/adapter#g" \
    configs/multimodal/unimoe_audio_smollm2.yaml >"$staged"
  fit_and_test unimoe-av "$seed" "$staged" --trainer.max_steps="$UNIFIED_STEPS"
  if [ "$BASELINE" = 1 ]; then
    fit_and_test six-lora "$seed" configs/multimodal/lora_smollm2.yaml "$SIX" --trainer.max_steps="$UNIFIED_STEPS" "${AUDIO_DATA[@]}" \
      --model.init_args.audio_encoder=$OUT/audio_encoder \
      --model.init_args.audio_projector_path="$aligned/audio_projector.safetensors"
  fi
done

tests() { local dirs=(); for seed in $SEEDS; do dirs+=("$OUT/$1/seed$seed-test"); done; (IFS=,; echo "${dirs[*]}"); }
echo "== the audio encoder on held-out voices (stage 0, last validation)"
$PY scripts/test_metrics_table.py --prefix val/ --no-mean "audio-encoder=$OUT/audio_encoder_training/fit"
echo "== per-domain accuracy (%), mean over seeds (each seed)"
$PY scripts/test_metrics_table.py "audio-lora=$(tests unimoe-audio)"
rows=("unimoe-av=$(tests unimoe-av)")
if [ "$BASELINE" = 1 ]; then rows=("lora=$(tests six-lora)" "${rows[@]}"); fi
$PY scripts/test_metrics_table.py "${rows[@]}"
echo "== share of each domain's and each modality's routed tokens per expert (%), first seed"
first=${SEEDS%% *}
$PY scripts/test_metrics_table.py --prefix test/expert_share/ "unimoe-av=$OUT/unimoe-av/seed$first-test"
$PY scripts/test_metrics_table.py --prefix test/modality_expert_share/ "unimoe-av=$OUT/unimoe-av/seed$first-test"
echo "== mutual information per layer and block"
for seed in $SEEDS; do $PY scripts/routing_information.py "$OUT/unimoe-av/seed$seed-test"; done
echo "== trivial baselines"
$PY scripts/multimodal_baselines.py --domains fashion digits textile grid arithmetic spoken
