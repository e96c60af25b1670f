# Sourced by every vfx-*.sbatch: one array task = one shard of one stage.
#   PROJ    the project directory (on a shared file system)
#   SHARDS  the array's shard count N, from `vfx plan` (passed explicitly, so that a re-submission
#           of a few indices from `vfx status --missing` keeps each index's chunks)
#   VFX     the vfx executable (default: vfx on PATH)
#   VFX_ARGS extra flags for the stage (e.g. "--steps 500 --save-steps 50")
set -uo pipefail
: "${PROJ:?set PROJ to the project directory}" "${SHARDS:?set SHARDS to the shard count from vfx plan}"
VFX=${VFX:-vfx}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

# Run shard SLURM_ARRAY_TASK_ID of SHARDS of a stage; requeue the task on exit 75 (disk full, out of
# memory: retryable), since finished chunks are kept and the rerun resumes.
run_shard() {
    local stage=$1
    shift
    # shellcheck disable=SC2086  # VFX_ARGS is a list of flags
    "$VFX" --quiet "$stage" "$PROJ" --shard "${SLURM_ARRAY_TASK_ID}/${SHARDS}" "$@" ${VFX_ARGS:-}
    local rc=$?
    if [ "$rc" -eq 75 ]; then
        scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    fi
    return "$rc"
}
