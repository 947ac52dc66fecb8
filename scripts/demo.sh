#!/usr/bin/env bash
# make demo: synthetic Lost & Found-style sequence -> rosbag2 -> the real detector node ->
# timing report, latency plot, hazard overlays and an output bag under out/demo/.
# Runs with the install space sourced (the Makefile does it). Re-running starts clean.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODELS="${DEMO_MODELS:-models/demo}"
CONFIG="${DEMO_CONFIG:-config/detector.yaml}"
OUT=out/demo
# Small on purpose: the demo must finish in a few minutes on 2 CPU cores.
HEIGHT="${DEMO_HEIGHT:-256}"
WIDTH="${DEMO_WIDTH:-512}"
FRAMES="${DEMO_FRAMES:-30}"

say() { printf '\033[1m[demo]\033[0m %s\n' "$*"; }

if [[ ! -f "$MODELS/segmenter.safetensors" ]]; then
  echo "make demo: the shipped demo models are missing: $MODELS/segmenter.safetensors" >&2
  echo "(they are trained on the synthetic world and committed under models/demo/;" >&2
  echo " set DEMO_MODELS=DIR to use another bundle directory)" >&2
  exit 2
fi
if [[ ! -f "$CONFIG" ]]; then
  echo "make demo: node parameters $CONFIG are missing" >&2
  exit 2
fi

rm -rf "$OUT"
mkdir -p "$OUT"
start=$SECONDS

say "rendering one world sequence with lost cargo ($FRAMES frames, ${WIDTH}x${HEIGHT})"
segsafe world --out "$OUT/world" --sequences 1 --train 0 --val 0 --anomaly 0 --negatives 0 \
  --sequence-length "$FRAMES" --height "$HEIGHT" --width "$WIDTH" --no-progress

say "writing the rosbag2"
segsafe make-bag --root "$OUT/world" --sequence seq_000 --out "$OUT/bag" --format mcap

say "replaying it through the detector node (then searching the highest sustainable rate)"
segsafe replay --bag "$OUT/bag" --models "$MODELS" --config "$CONFIG" --out "$OUT/T.json" \
  --output-bag "$OUT/output_bag" --overlays "$OUT/overlays" --overlay-count 4 \
  --find-max-rate --search-seconds 2 --search-trials 6

say "done in $((SECONDS - start)) s. Open:"
echo "  $OUT/T.json              timing report (frames, latency percentiles and by stage,"
echo "                           node overhead, max rate, AP)"
echo "  $OUT/T_latency.png       latency per frame, histogram and the stages"
echo "  $OUT/overlays/*.png      hazard overlays published by the node"
echo "  $OUT/output_bag/         input + every output topic (ros2 bag info / play)"
echo "  $OUT/bag/                the input bag (ros2 bag play $OUT/bag)"
