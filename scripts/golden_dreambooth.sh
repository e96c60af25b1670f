#!/usr/bin/env bash
# A small DreamBooth run through regularize, train (full and LoRA) and sample on the embedded tiny model,
# for before/after byte-identity checks with scripts/artifact_digests.py (the demo covers the video stages).
#   VFX=.venv/bin/vfx bash scripts/golden_dreambooth.sh /tmp/golden && python scripts/artifact_digests.py /tmp/golden
set -euo pipefail
VFX=${VFX:-vfx}
DIR=${1:?usage: golden_dreambooth.sh DIR}
PHOTOS=${PHOTOS:-../shared/data/dreambooth/dog}
export OMP_NUM_THREADS=1
[ -f "$DIR/vfx.toml" ] || "$VFX" init "$DIR"
"$VFX" regularize "$DIR" --name dog --class-prompt "a photo of a dog" --num-images 4 --steps 2 --size 64
"$VFX" train "$DIR" --name dog --instance-dir "$PHOTOS" --instance-prompt "a photo of zwx dog" \
  --max-steps 3 --checkpoint-every 2 --resolution 64 --train-text-encoder
"$VFX" train "$DIR" --name dog-lora --class-dir "$DIR/dreambooth/dog/class" --class-prompt "a photo of a dog" \
  --instance-dir "$PHOTOS" --instance-prompt "a photo of zwx dog" --mode lora --max-steps 3 --resolution 64 \
  --train-text-encoder
"$VFX" sample "$DIR" --name dog --prompt "a zwx dog on the beach" --num-images 2 --steps 2 --size 64
"$VFX" sample "$DIR" --name dog-lora --prompt "a zwx dog on the beach" --num-images 2 --steps 2 --size 64
