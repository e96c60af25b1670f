#!/usr/bin/env bash
# The main job on the embedded tiny model: a real video through every video stage.
# Idempotent: run it again and every stage reports "up to date".
set -euo pipefail
VFX=${VFX:-vfx}
DIR=${DEMO_DIR:-demo}
VIDEO=${SHARED_VIDEO:-../shared/data/videos/woman-running.mp4}

if [ ! -f "$VIDEO" ]; then
  VIDEO="$DIR-input.mp4"
  echo "sample video not found; generating $VIDEO" >&2
  [ -f "$VIDEO" ] || "$VFX" demo-video "$VIDEO" --frames 24 --size 128
fi
[ -f "$DIR/vfx.toml" ] || "$VFX" init "$DIR" --video "$VIDEO" --size 128x128 --max-frames 24 --prompt "a woman running"

"$VFX" extract "$DIR"
"$VFX" encode "$DIR"
"$VFX" invert "$DIR" --steps 50 --save-steps 25
"$VFX" flow "$DIR"
"$VFX" edit "$DIR" --name statue --prompt "a marble statue running" --steps 25
# The variants together: SDEdit from 0.8 of the noise, Canny ControlNet, flow correspondences.
"$VFX" edit "$DIR" --name statue-edges --prompt "a marble statue running" --steps 25 \
  --method sdedit --start 0.8 --control canny --correspondence flow
"$VFX" decode "$DIR"
"$VFX" decode "$DIR" --edit statue
"$VFX" decode "$DIR" --edit statue-edges
"$VFX" eval "$DIR" --edit statue
"$VFX" status "$DIR"
"$VFX" report "$DIR"
echo "edited video: $DIR/decoded/statue/video.mp4; report: $DIR/report/index.html" >&2
