#!/usr/bin/env bash
# The main job on the embedded tiny model: a real video through every video stage, in one `vfx run`,
# then an edit with the variants (SDEdit, Canny ControlNet, flow correspondences) beside it.
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
# 24 frames at 128x128 and a 25-step editing schedule: about 3 minutes on 2 CPU cores.
"$VFX" run "$DIR" "$VIDEO" --prompt "a marble statue running" --name statue --source-prompt "a woman running" \
  --size 128x128 --max-frames 24 --steps 25
# The variants together: SDEdit from 0.8 of the noise, Canny ControlNet, flow correspondences.
"$VFX" edit "$DIR" --name statue-edges --prompt "a marble statue running" --steps 25 \
  --method sdedit --start 0.8 --control canny --correspondence flow
"$VFX" decode "$DIR" --edit statue-edges
"$VFX" status "$DIR"
"$VFX" report "$DIR" >/dev/null
echo "report: $DIR/report/index.html" >&2
echo "contact sheet (source | reconstruction | edit): $DIR/report/sheet-statue.png" >&2
