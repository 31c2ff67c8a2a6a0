#!/usr/bin/env bash
# Screenshots of TensorBoard over a run's logs, taken in headless Chromium (Debian package `chromium`).
# Usage: scripts/tensorboard_screenshot.sh LOGDIR OUTDIR   -> OUTDIR/tensorboard.png, OUTDIR/tensorboard_profile.png
set -euo pipefail
logdir=${1:?LOGDIR}; outdir=${2:?OUTDIR}; port=${PORT:-6123}
here=$(cd "$(dirname "$0")/.." && pwd)
tb=${TENSORBOARD:-$here/.venv/bin/tensorboard}
mkdir -p "$outdir"
"$tb" --logdir "$logdir" --port "$port" --host 127.0.0.1 >/tmp/gradspectra_tb.log 2>&1 &
tb_pid=$!
trap 'kill $tb_pid 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 1; done
shot() {  # url file height
  chromium --headless --no-sandbox --enable-unsafe-swiftshader --use-angle=swiftshader --disable-quic \
    --no-first-run --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$(mktemp -d)" --window-size=1400,"$3" --virtual-time-budget=25000 \
    --screenshot="$2" "$1" 2>/dev/null
}
shot "http://127.0.0.1:$port/#custom_scalars" "$outdir/tensorboard.png" 1000
shot "http://127.0.0.1:$port/#images&tagFilter=grad_spectrum_profile" "$outdir/tensorboard_profile.png" 1000
ls -l "$outdir"/tensorboard*.png
