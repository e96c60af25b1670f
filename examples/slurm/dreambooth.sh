#!/bin/bash
# Submit DreamBooth as SLURM jobs: regularize[N] -> train (accelerate, one node) -> sample[M].
# Usage: RUN=dog CLASS_PROMPT="a photo of a dog" INSTANCE_DIR=photos/ INSTANCE_PROMPT="a photo of sks dog" \
#        PROMPT="a sks dog on the beach" examples/slurm/dreambooth.sh PROJ
# Environment: NUM_IMAGES (class images, default 200), SAMPLES (images per prompt, default 8),
#              BATCH (images per unit, default 4), GPUS (training processes, default 1), VFX.
set -euo pipefail
PROJ=$(realpath "${1:?usage: dreambooth.sh PROJ}")
: "${RUN:?}" "${CLASS_PROMPT:?}" "${INSTANCE_DIR:?}" "${INSTANCE_PROMPT:?}" "${PROMPT:?}"
VFX=${VFX:-vfx}
HERE=$(cd "$(dirname "$0")" && pwd)
BATCH=${BATCH:-4}
GPUS=${GPUS:-1}
CLASS_IMAGES=${NUM_IMAGES:-200}
SAMPLES=${SAMPLES:-8}
mkdir -p logs
export PROJ VFX RUN CLASS_PROMPT PROMPT BATCH VFX_SLURM=$HERE

shards=$("$VFX" plan "$PROJ" regularize --name "$RUN" --images "$CLASS_IMAGES" --batch-size "$BATCH")
regularize=$(SHARDS=$shards NUM_IMAGES=$CLASS_IMAGES sbatch --parsable --array="0-$((shards - 1))" \
    --export=ALL "$HERE/vfx-regularize.sbatch")

train=$(sbatch --parsable --dependency=afterok:"$regularize" --job-name=vfx-train --gres=gpu:"$GPUS" \
    --output=logs/%x-%j.out --wrap "accelerate launch --num_processes $GPUS -m vfx --quiet train '$PROJ' \
    --name '$RUN' --instance-dir '$(realpath "$INSTANCE_DIR")' --instance-prompt '$INSTANCE_PROMPT'")

shards=$("$VFX" plan "$PROJ" sample --name "$RUN" --images "$SAMPLES" --batch-size "$BATCH")
sample=$(SHARDS=$shards NUM_IMAGES=$SAMPLES sbatch --parsable --array="0-$((shards - 1))" \
    --dependency=afterok:"$train" --export=ALL "$HERE/vfx-sample.sbatch")
echo "submitted: regularize $regularize, train $train, sample $sample"
