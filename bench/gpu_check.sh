#!/usr/bin/env bash
# SD 1.5-size speed and memory of the real vfx stages on one CUDA GPU, in one run of about 8 minutes:
# DDIM inversion and a TokenFlow edit of a 120-frame 512x512 clip (10 steps each) and a DreamBooth LoRA
# training step at 512 px, in fp16 and then bf16, on `vfx model random --arch sd15` (SD 1.5's
# architecture, random weights: nothing is downloaded); then the inversion and edit of a 32-frame
# 1024x1024 clip on `vfx model random --arch sdxl` in fp16. Prints one markdown table.
#
#   bench/gpu_check.sh wheels      # where PyPI is reachable: fetch the wheels the GPU machine lacks into .whl/
#   bench/gpu_check.sh             # on the GPU machine, from the repository root (.whl/ beside it)
#   GPU_CHECK_DRY=1 bench/gpu_check.sh   # the same parts on the CPU at toy size (tiny model, 64 px, 4 frames, 2 steps)
#
# It needs no network and no .venv: it makes its own venv ($GPU_CHECK_VENV, default /tmp/gpu-venv) on top
# of the Python that has torch ($GPU_CHECK_PYTHON, default python3; its packages stay visible through a
# .pth file), installs from .whl/ ($GPU_CHECK_WHEELS) only the packages that Python lacks, and installs vfx
# from this checkout without dependencies. Each part runs under its own time limit, capped by what is
# left of the whole budget ($GPU_CHECK_BUDGET seconds, default 450); a part that fails or runs out of
# time is marked in the table and the parts that do not depend on it still run.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
# What vfx needs beyond what a CUDA PyTorch image with transformers, accelerate, peft and opencv holds.
WHEEL_PACKAGES="diffusers zarr numcodecs donfig google-crc32c av"

if [ "${1:-}" = wheels ]; then
    PY=${GPU_CHECK_PYTHON:-$REPO/.venv/bin/python}
    pins=$("$PY" -c "import importlib.metadata as m, sys; print(' '.join(f'{p}=={m.version(p)}' for p in sys.argv[1:]))" $WHEEL_PACKAGES) || exit 1
    mkdir -p "$WHEELS"
    # The GPU machine: CPython 3.12 on x86-64 Linux.
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" $pins
fi

DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET:-450}
WORK=${GPU_CHECK_WORK:-/tmp/gpu-check}
VENV=${GPU_CHECK_VENV:-/tmp/gpu-venv}
if [ "$DRY" = 1 ]; then
    BASE_PY=${GPU_CHECK_PYTHON:-$REPO/.venv/bin/python}
    MODEL=tiny; MODEL_LABEL="tiny"; SIZE=64; FRAMES=4; STEPS=2; TRAIN_STEPS=4; DEVICE=cpu
    MAIN=fp32; ALT=bf16; MP_MAIN=no; MP_ALT=bf16
    XL_MODEL=tiny-xl; XL_LABEL="tiny-xl"; XL_SIZE=64; XL_FRAMES=4
else
    BASE_PY=${GPU_CHECK_PYTHON:-python3}
    MODEL=$WORK/sd15; MODEL_LABEL="SD 1.5 architecture (random fp16 weights)"; SIZE=512; FRAMES=120; STEPS=10
    TRAIN_STEPS=20; DEVICE=cuda; MAIN=fp16; ALT=bf16; MP_MAIN=fp16; MP_ALT=bf16
    XL_MODEL=$WORK/sdxl; XL_LABEL="SDXL architecture (random fp16 weights)"; XL_SIZE=1024; XL_FRAMES=32
fi
PY=$VENV/bin/python
CHECK=("$PY" "$REPO/bench/gpu_check.py")

setup() {
    rm -rf "$VENV" "$WORK/src"
    "$BASE_PY" -c "import torch" || { echo "$BASE_PY has no torch: set GPU_CHECK_PYTHON"; return 1; }
    "$BASE_PY" -m venv --without-pip "$VENV" || return 1
    local purelib
    purelib=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
    "$BASE_PY" -c 'import sys; print("\n".join(f"import site; site.addsitedir({p!r})" for p in sys.path
                                                 if p.endswith(("site-packages", "dist-packages"))))' \
        >"$purelib/gpu-check-base.pth" || return 1
    "$PY" -m pip --version || "$PY" -m ensurepip || return 1
    local missing
    missing=$("$PY" - $WHEEL_PACKAGES <<'EOF'
import importlib.util, sys
modules = {"google-crc32c": "google_crc32c"}
print(" ".join(p for p in sys.argv[1:] if importlib.util.find_spec(modules.get(p, p)) is None))
EOF
) || return 1
    if [ -n "$missing" ]; then
        echo "installing from $WHEELS: $missing"
        # (from $WORK: pip takes a name that is also a folder in the current directory for that folder)
        (cd "$WORK" && "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" $missing) \
            || { echo "missing $missing: run 'bench/gpu_check.sh wheels' where PyPI is reachable"; return 1; }
    fi
    # vfx itself, from a copy of the checkout (the build writes nothing into the checkout).
    mkdir -p "$WORK/src" && cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/vfx" "$WORK/src/" || return 1
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation "$WORK/src" || return 1
    "$PY" -c "import vfx.cli, vfx.random_models; print('vfx from', vfx.__file__)" || return 1
    "${CHECK[@]}" env "$WORK/results/env.json"
}

if [ "${1:-}" = --setup ]; then setup; exit $?; fi

START=$SECONDS
RESERVE=15  # seconds kept for the table
rm -rf "$WORK" && mkdir -p "$WORK/results" "$WORK/status" "$WORK/logs" || exit 1
PROJECT=$WORK/p
export PYTHONUNBUFFERED=1 VFX_QUIET=1 VFX_CACHE_DIR=$WORK/cache HF_HUB_OFFLINE=1
[ "$DRY" = 1 ] && export OMP_NUM_THREADS=1  # a shared CPU: spinning thread pools distort timings

mp_label() { if [ "$1" = no ]; then echo fp32; else echo "$1 autocast, $1 frozen UNet, fp32 LoRA"; fi; }
"$BASE_PY" - "$WORK/settings.json" <<EOF
import json, sys
json.dump({"dry": $DRY == 1, "model_label": "$MODEL_LABEL", "size": $SIZE, "frames": $FRAMES, "steps": $STEPS,
           "train_steps": $TRAIN_STEPS, "xl_label": "$XL_LABEL", "xl_size": $XL_SIZE, "xl_frames": $XL_FRAMES,
           "dtypes": {"model": "fp16" if $DRY != 1 else "", "clip": "fp32 VAE",
           "invert-main": "$MAIN", "edit-main": "$MAIN", "train-main": "$(mp_label $MP_MAIN)",
           "model-xl": "fp16" if $DRY != 1 else "", "clip-xl": "fp32 VAE", "invert-xl": "$MAIN", "edit-xl": "$MAIN",
           "edit-alt": "$ALT", "invert-alt": "$ALT", "train-alt": "$(mp_label $MP_ALT)"}},
          open(sys.argv[1], "w"))
EOF

# part NAME CAP_SECONDS COMMAND...: run COMMAND under min(CAP, what is left of the budget); record its status.
part() {
    local name=$1 cap=$2 left rc began
    shift 2
    left=$((BUDGET - (SECONDS - START) - RESERVE))
    [ "$cap" -lt "$left" ] && left=$cap
    if [ "$left" -lt 20 ]; then
        echo "skipped: out of time" >"$WORK/status/$name"; echo "[$name] skipped: out of time" >&2; return 1
    fi
    echo "[$name] up to ${left}s" >&2
    began=$SECONDS
    timeout -k 10 "$left" "$@" >"$WORK/logs/$name.log" 2>&1
    rc=$?
    if [ $rc = 0 ]; then
        echo "ok ($((SECONDS - began))s)" >"$WORK/status/$name"
    elif [ $rc = 124 ] || [ $rc = 137 ]; then
        echo "timed out after ${left}s" >"$WORK/status/$name"
        [ -f "$WORK/results/$name.json" ] && "${CHECK[@]}" partial "$WORK/results/$name.json" >/dev/null 2>&1
    else
        echo "failed (exit $rc): $(grep -v '^\s*$' "$WORK/logs/$name.log" | tail -1 | cut -c1-150 | tr '|' '/')" >"$WORK/status/$name"
    fi
    echo "[$name] $(cat "$WORK/status/$name")" >&2
    return $rc
}
skip() { echo "skipped: $2" >"$WORK/status/$1"; }

part setup 150 bash "$REPO/bench/gpu_check.sh" --setup || { "${CHECK[@]}" table "$WORK" 2>/dev/null || cat "$WORK/status/setup"; exit 1; }
have_model=1
if [ "$DRY" = 1 ]; then
    skip model "dry run: the tiny model"
else
    part model 180 "${CHECK[@]}" stage "$WORK/results/model.json" none:: -- model random --arch sd15 --out "$MODEL" \
        --dtype fp16 || have_model=0
fi
have_clip=0
if [ $have_model = 1 ]; then
    part clip 150 "${CHECK[@]}" clip "$WORK/results/clip.json" "$PROJECT" "$MODEL" $SIZE $FRAMES $DEVICE && have_clip=1
else
    skip clip "no model"
fi
stage() {  # stage NAME KIND:FRAMES:FOLDER CAP VFX_ARGS...
    local name=$1 spec=$2 cap=$3
    shift 3
    part "$name" "$cap" "${CHECK[@]}" stage "$WORK/results/$name.json" "$spec" -- "$@"
}
prompt="a red robot walking on a beach"
if [ $have_clip = 1 ]; then
    if stage invert-main "invert:$FRAMES:$PROJECT/inversion" 120 invert "$PROJECT" --save-steps $STEPS \
        --no-reconstruction --dtype $MAIN --device $DEVICE; then
        stage edit-main "edit::$PROJECT/edits/main" 200 edit "$PROJECT" --prompt "$prompt" --name main --steps $STEPS \
            --dtype $MAIN --device $DEVICE
    else
        skip edit-main "no inversion"
    fi
else
    skip invert-main "no clip"; skip edit-main "no clip"
fi
train() {  # train NAME MIXED_PRECISION
    stage "$1" "train::$PROJECT/dreambooth/$1" 120 train "$PROJECT" --name "$1" --instance-dir "$WORK/photos" \
        --instance-prompt "a photo of zwx dog" --mode lora --resolution $SIZE --max-steps $TRAIN_STEPS \
        --checkpoint-every $TRAIN_STEPS --eval-pairs 0 --mixed-precision "$2" --device $DEVICE
}
if [ $have_clip = 1 ]; then train train-main $MP_MAIN; else skip train-main "no clip"; fi

# SDXL at 1024 px: its own model and clip, then the inversion and the edit (main dtype).
XL_PROJECT=$WORK/xl/p  # its clip and photos beside it, in $WORK/xl
mkdir -p "$WORK/xl"
have_xl=1
if [ "$DRY" = 1 ]; then
    skip model-xl "dry run: the tiny-xl model"
else
    part model-xl 150 "${CHECK[@]}" stage "$WORK/results/model-xl.json" none:: -- model random --arch sdxl \
        --out "$XL_MODEL" --dtype fp16 || have_xl=0
fi
if [ $have_xl = 1 ] && part clip-xl 120 "${CHECK[@]}" clip "$WORK/results/clip-xl.json" "$XL_PROJECT" "$XL_MODEL" \
        $XL_SIZE $XL_FRAMES $DEVICE; then
    if stage invert-xl "invert:$XL_FRAMES:$XL_PROJECT/inversion" 120 invert "$XL_PROJECT" --save-steps $STEPS \
        --no-reconstruction --dtype $MAIN --device $DEVICE; then
        stage edit-xl "edit::$XL_PROJECT/edits/main" 150 edit "$XL_PROJECT" --prompt "$prompt" --name main \
            --steps $STEPS --dtype $MAIN --device $DEVICE
    else
        skip edit-xl "no inversion"
    fi
else
    [ $have_xl = 1 ] || skip clip-xl "no model"
    skip invert-xl "no clip"; skip edit-xl "no clip"
fi
# The bf16 variant: the edit reads the inversion above; the bf16 inversion then replaces it.
if [ $have_clip = 1 ] && grep -q '^ok' "$WORK/status/invert-main"; then
    stage edit-alt "edit::$PROJECT/edits/alt" 200 edit "$PROJECT" --prompt "$prompt" --name alt --steps $STEPS \
        --dtype $ALT --device $DEVICE
    stage invert-alt "invert:$FRAMES:$PROJECT/inversion" 120 invert "$PROJECT" --save-steps $STEPS \
        --no-reconstruction --dtype $ALT --device $DEVICE
else
    skip edit-alt "no inversion"; skip invert-alt "no inversion"
fi
if [ $have_clip = 1 ]; then train train-alt $MP_ALT; else skip train-alt "no clip"; fi

echo "total $((SECONDS - START))s of ${BUDGET}s; logs in $WORK/logs" >&2
"${CHECK[@]}" table "$WORK"
