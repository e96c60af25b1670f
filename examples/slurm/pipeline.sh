#!/bin/bash
# Submit the video pipeline as SLURM job arrays chained with --dependency=afterok:
#
#   extract (one job, waited for) -> encode[N] -> invert[N] -> eval --inversion[N]
#                                 -> flow[N-1 pairs] ---------^
#                                    encode[N] -> decode[N]
#                  (DEPTH=1, for a depth model: depth[N] too, before invert)
#
# Usage: examples/slurm/pipeline.sh PROJ [PER_SHARD]
#   PROJ       a project made by `vfx init PROJ --video FILE ...` on a shared file system
#   PER_SHARD  chunks per array task (default 1: one task per chunk)
# Environment: VFX (the vfx executable), INVERT_ARGS (e.g. "--steps 500 --save-steps 50"), DEPTH=1 for a
# depth model (stable-diffusion-2-depth: `vfx depth` runs before the inversion).
# Array sizes come from `vfx plan`, after extraction, from frames/frames.zarr's shape.
set -euo pipefail
PROJ=$(realpath "${1:?usage: pipeline.sh PROJ [PER_SHARD]}")
PER_SHARD=${2:-1}
VFX=${VFX:-vfx}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p logs
export PROJ VFX VFX_SLURM=$HERE

# extract is not shardable; --wait blocks until it is done, so the plan below sees the frames.
sbatch --wait --job-name=vfx-extract --output=logs/%x-%j.out --wrap "$VFX --quiet extract '$PROJ'"

# submit STAGE AFTER [VFX_ARGS]: an array of `vfx plan` shards of STAGE, after job AFTER (or none).
submit() {
    local stage=$1 after=$2 args=${3:-} shards
    shards=$("$VFX" plan "$PROJ" "$stage" --per-shard "$PER_SHARD")
    SHARDS=$shards VFX_ARGS=$args sbatch --parsable --array="0-$((shards - 1))" \
        ${after:+--dependency=afterok:$after} --export=ALL "$HERE/vfx-$stage.sbatch"
}

encode=$(submit encode "")
before_invert=$encode
if [ "${DEPTH:-0}" = 1 ]; then
    depth=$(submit depth "")
    before_invert=$encode:$depth
fi
invert=$(submit invert "$before_invert" "${INVERT_ARGS:-}")
flow=$(submit flow "")
decode=$(submit decode "$encode")
evaluate=$(submit eval "$invert:$flow")
echo "submitted: encode $encode, invert $invert, flow $flow, decode $decode, eval $evaluate"
echo "after a failure, re-submit only what is missing, e.g.: $HERE/resubmit.sh $PROJ invert"
