#!/usr/bin/env bash
# The accelerator run behind the shapes model v2 (docs/shapes-model.md): the v2 recipe in three UNet sizes,
# trained side by side on one GPU within a wall-clock budget, so that one short lease compares them.
#   bash bench/train_shapes_gpu.sh OUT_DIR SECONDS
# Each variant is an ordinary `diffsteer train shapes --preset v2` run: its work/recipe.json records the
# step count this script chose from the measured speed, and re-running that command reproduces it.
set -euo pipefail -f  # -f: the recipe values hold [ ] that must not glob
OUT=${1:?output folder}; BUDGET=${2:-420}
START=$(date +%s)
mkdir -p "$OUT"
DS=(python3 -c 'import sys; from diffsteer.cli import main; sys.exit(main())')
declare -A SETS=(
  [v2s]="--set unet_block_out_channels=[64,128,128] --set unet_lr=0.0008"
  [v2l]=""
  [v2d]="--set unet_block_out_channels=[64,128,128] --set unet_layers_per_block=2 --set unet_lr=0.0008"
)
T=${THREADS:-4}  # torch threads per run: three runs share 16 cores
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}  # more options for every run (a small CPU rehearsal: --n-images 600 --set unet_batch_size=4)
# Stages 1-3 once (the scenes render on every core), then the other runs reuse those files.
"${DS[@]}" train shapes --preset v2 --out "$OUT/v2s" --device $DEVICE $EXTRA --threads $T ${SETS[v2s]} --time-steps 8 \
  > "$OUT/prepare.log" 2>&1
VARIANTS=${VARIANTS:-v2s v2l v2d}
for v in v2l v2d; do
  mkdir -p "$OUT/$v/work"
  for f in data.safetensors captions.json latents.safetensors; do ln -s "$OUT/v2s/work/$f" "$OUT/$v/work/$f"; done
done
for v in $VARIANTS; do
  "${DS[@]}" train shapes --preset v2 --out "$OUT/$v" --device $DEVICE $EXTRA --threads $T ${SETS[$v]} --time-steps 30 \
    > "$OUT/$v-timing.log" 2>&1 &
done
wait
NOW=$(date +%s); LEFT=$(( BUDGET - (NOW - START) - 60 ))
echo "after timing: $((NOW - START)) s spent, $LEFT s for training"
for v in $VARIANTS; do
  SPS=$(grep '^seconds per step' "$OUT/$v-timing.log" | awk '{print $4}')
  STEPS=$(python3 -c "print(max(100, int(($LEFT - 25) / $SPS * 0.9)))")
  echo "$v: $SPS s/step -> $STEPS steps"
  timeout $(( LEFT + 30 )) "${DS[@]}" train shapes --preset v2 --out "$OUT/$v" --device $DEVICE $EXTRA --threads $T ${SETS[$v]} \
    --unet-steps "$STEPS" > "$OUT/$v-train.log" 2>&1 &
done
wait || true
echo "total: $(( $(date +%s) - START )) s"
