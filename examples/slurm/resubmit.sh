#!/bin/bash
# Re-submit only the array indices of STAGE whose chunks are not done (or are damaged).
# Usage: examples/slurm/resubmit.sh PROJ STAGE [SHARDS]
#   SHARDS: the shard count of the original submission (default: vfx plan's, one chunk per task)
# Stages needing a name (decode/eval: EDIT; regularize/sample: RUN, NUM_IMAGES) read the same
# environment as their vfx-STAGE.sbatch.
set -euo pipefail
PROJ=$(realpath "${1:?usage: resubmit.sh PROJ STAGE [SHARDS]}")
STAGE=${2:?usage: resubmit.sh PROJ STAGE [SHARDS]}
VFX=${VFX:-vfx}
HERE=$(cd "$(dirname "$0")" && pwd)
name=()
case $STAGE in
    decode) [ -n "${EDIT:-}" ] && name=(--name "$EDIT") ;;
    eval) name=(--name "${EDIT:-inversion}") ;;
    regularize | sample) name=(--name "${RUN:?set RUN}" --images "${NUM_IMAGES:?set NUM_IMAGES}" --batch-size "${BATCH:-4}") ;;
esac
SHARDS=${3:-$("$VFX" plan "$PROJ" "$STAGE" "${name[@]}")}
missing=$("$VFX" status "$PROJ" --missing "$STAGE" --shards "$SHARDS" --verify "${name[@]}")
if [ -z "$missing" ]; then
    echo "$STAGE: every shard is done"
    exit 0
fi
mkdir -p logs
export PROJ VFX VFX_SLURM=$HERE
export SHARDS
sbatch --array="$missing" --export=ALL "$HERE/vfx-$STAGE.sbatch"
