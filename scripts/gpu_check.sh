#!/usr/bin/env bash
# The device checks of issue 14, prepared to run in one go on a machine with a CUDA GPU:
# the CUDA tests, the outputs' copy to the host (page-locked or not), jpeg by nvJPEG and
# by OpenCV, the model bench and the node bench (512x1024 and 1024x2048, output_scale 1
# and 0.5, network at the frame's size) on cuda in fp16 autocast and in fp32, and the
# cuda node in a process of its own with the shipped shared-memory profile (how a robot
# runs it, RViz in another process), also at 2 MP with only a planner's, RViz's and a
# jpeg viewer's outputs subscribed (the ~16 ms question), with jpeg frames decoded on
# the host (the default) and on the GPU, and the highest input rate the cuda node keeps
# up with, with and without overlap_publish.
# Needs the environment `make setup` builds; writes JSONs and a log
# under $1 (default out/gpu_check), the world and bag it replays under a scratch folder
# (SCRATCH, default a temporary one), so OUT holds only the log and the JSONs (the device
# tool returns at most 8 files).
# Usage: bash scripts/gpu_check.sh [OUT_DIR]
# Environment: DEVICE (cuda; cpu rehearses the pass without the CUDA-only steps),
# STEP_TIMEOUT_S (150: each step's limit), DEADLINE_S (420: no step starts later).
#
# On the GPU machine lent to sessions (CPython 3.12 with PyTorch, no ROS 2, no package
# index), one call of the device tool, with the wheels made here first
# (`bash scripts/device_wheels.sh`, into the git-ignored .whl.tar.xz) and carried:
#   SEGSAFE_WHEELS=.whl.tar.xz bash scripts/setup.sh && DEADLINE_S=$((420 - SECONDS)) bash scripts/gpu_check.sh "$OUT"
# (SECONDS there counts the setup too: no step starts after 420 s of the call, and the
# last one ends by 420 + STEP_TIMEOUT_S + 15 = 585 s, inside the tool's 600.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-out/gpu_check}"
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
SCRATCH="${SCRATCH:-$(mktemp -d)}"

set +u  # the colcon setup scripts read unset variables
source scripts/env.sh
source install/setup.bash
set -u
# DEVICE=cpu rehearses the pass here (the node and model steps on the CPU, the CUDA-only
# tests, copies and jpeg timings left out), so the script itself is checked off the GPU.
export DEVICE="${DEVICE:-cuda}"
if [ "$DEVICE" = cuda ]; then
  python -P -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
fi

say() { printf '\n[gpu_check] %s\n' "$*"; }
# A device slot is short and lent rarely: a failing step is reported and the others
# still run; the exit status says whether any failed. The device tool gives one command
# 600 s, setup included, so each step has a time limit (STEP_TIMEOUT_S) and no step
# starts after DEADLINE_S seconds of this script: the most telling steps come first,
# and a cut-short run still returns what it finished.
STEP_TIMEOUT_S="${STEP_TIMEOUT_S:-150}"
DEADLINE_S="${DEADLINE_S:-420}"
failed=()
skipped=()
step() {
  local name=$1
  shift
  if ((SECONDS > DEADLINE_S)); then
    skipped+=("$name")
    say "SKIPPED (past ${DEADLINE_S} s): $name"
    return
  fi
  say "$name (${SECONDS} s in)"
  # bash -c so that the functions below (exported) run under timeout too.
  if ! timeout --signal=INT --kill-after=15 "$STEP_TIMEOUT_S" bash -c '"$@"' step "$@"; then
    failed+=("$name")
    say "FAILED or timed out: $name (going on)"
  fi
}

cuda_step() {  # step, on a GPU only
  if [ "$DEVICE" = cuda ]; then step "$@"; else say "(not on $DEVICE) $1"; fi
}
cuda_step "CUDA tests" python -P -m pytest -q -x test/test_cuda.py

# The frame's outputs to the host (to_host: one packed copy) into page-locked memory, the
# node's way, against ordinary memory; the log has the medians.
d2h() {
  python -P - <<'PY'
import time
import torch
from segmentation_safety.pipeline import to_host
for h, w in ((512, 1024), (1024, 2048)):
    # What every output subscribed sends: labels, colours, overlay, two maps, open set.
    dev = {"labels": torch.zeros(h, w, dtype=torch.uint8), "color": torch.zeros(h, w, 3, dtype=torch.uint8),
           "overlay": torch.zeros(h, w, 3, dtype=torch.uint8), "anomaly": torch.zeros(h, w),
           "failure": torch.zeros(h, w), "open_set": torch.zeros(h, w, dtype=torch.uint8)}
    dev = {k: t.cuda() for k, t in dev.items()}
    mb = sum(t.numel() * t.element_size() for t in dev.values()) / 2**20
    times = {True: [], False: []}
    for i in range(42):
        pinned = bool(i % 2)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        host = to_host(dev, pinned=pinned)
        if i >= 2:
            times[pinned].append((time.perf_counter() - t0) * 1e3)
        del host
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"to_host {h}x{w} ({mb:.0f} MB): pinned {med[True]:.2f} ms, pageable {med[False]:.2f} ms")
PY
}
export -f d2h
cuda_step "outputs to the host, page-locked vs ordinary memory" d2h
# jpeg_codec: a 2 MP frame decoded and encoded by nvJPEG (jpeg_codec's auto on CUDA)
# against OpenCV on the host; the log has the medians.
jpeg_times() {
  python -P - <<'PY'
import time
import cv2
import numpy as np
import torch
from segmentation_safety import device_jpeg
# Gradients with sensor-like noise: a file about the size of a street frame's.
yy, xx = np.mgrid[0:1024, 0:2048]
noise = np.random.default_rng(0).normal(0, 8, (1024, 2048, 3))
rgb = np.clip(np.stack([xx / 8, yy / 4, (xx + yy) / 12], axis=2) + noise, 0, 255).astype(np.uint8)
data = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
on_gpu = torch.from_numpy(rgb).cuda()
def median_ms(fn):
    fn()
    times = []
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[10]
cuda = torch.device("cuda")
print(f"jpeg 2 MP decode: nvJPEG {median_ms(lambda: device_jpeg.decode(data, cuda)):.2f} ms, "
      f"OpenCV {median_ms(lambda: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)):.2f} ms")
print(f"jpeg 2 MP encode: nvJPEG {median_ms(lambda: device_jpeg.encode(on_gpu, 90).cpu()):.2f} ms, "
      f"OpenCV {median_ms(lambda: cv2.imencode('.jpg', rgb, [cv2.IMWRITE_JPEG_QUALITY, 90])):.2f} ms")
# How far nvJPEG's pixels are from libjpeg-turbo's (what calibration saw): jpeg_codec's
# default decodes frames on the host because of this difference.
host = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1].astype(int)
diff = np.abs(device_jpeg.decode(data, cuda).cpu().numpy().astype(int) - host)
print(f"nvJPEG vs libjpeg-turbo pixels: mean {diff.mean():.3f} levels, {(diff > 0).mean():.1%} "
      f"differ, {(diff > 2).mean():.2%} by more than 2, max {diff.max()}")
PY
}
export -f jpeg_times
cuda_step "jpeg on the GPU against OpenCV" jpeg_times


# The benches below need this bag: a failure here ends the run.
say "a world sequence and its bag"
segsafe world --force --out "$SCRATCH/world" --sequences 1 --train 0 --val 0 --anomaly 0 --negatives 0 \
  --sequence-length 6 --height 512 --width 1024 --no-progress
segsafe make-bag --root "$SCRATCH/world" --sequence seq_000 --out "$SCRATCH/bag" --format mcap

node_bench=(segsafe bench --node --bag "$SCRATCH/bag" --config config/detector.yaml
  --param "input_size=[512,1024]")
export PROFILE_FILE="$PWD/config/fastdds_same_host.xml" SCRATCH OUT
profile=(env FASTDDS_DEFAULT_PROFILES_FILE="$PROFILE_FILE")
# Most telling first: issue 14's table (fp16 autocast, the node's default on CUDA),
# then the robot's 2 MP row (the ~16 ms question), then throughput and overlap_publish,
# then the rest.
step "node bench on cuda, fp16" "${node_bench[@]}" --sizes 512x1024,1024x2048 \
  --output-scales 1,0.5 --frames 16 --param "device=$DEVICE" --param fp16=true \
  --out "$OUT/node_cuda_fp16.json"
# Frames sent raw and as jpeg (a camera on image/compressed); jpeg_codec's default on
# CUDA: the overlay encoded by nvJPEG, frames decoded by OpenCV.
step "node bench on cuda, own process, 2 MP, a robot's subscribers (planner, RViz boxes, jpeg)" \
  "${profile[@]}" "${node_bench[@]}" --node-process --sizes 1024x2048 --frames 16 --inputs raw,jpeg \
  --outputs safety,hazards,hazard_overlay_compressed --param "device=$DEVICE" \
  --param safety_embeds_maps=false --out "$OUT/node_cuda_process_same_host_2mp_planner_rviz_jpeg.json"
# The jpeg frames again with jpeg_codec=device: decoded by nvJPEG too (auto, above,
# encodes the overlay there and decodes frames on the host); what that saves the host.
step "the same, jpeg_codec=device" \
  "${profile[@]}" "${node_bench[@]}" --node-process --sizes 1024x2048 --frames 16 --inputs jpeg \
  --outputs safety,hazards,hazard_overlay_compressed --param "device=$DEVICE" \
  --param safety_embeds_maps=false --param jpeg_codec=device \
  --out "$OUT/node_cuda_process_same_host_2mp_planner_rviz_jpeg_device.json"
# Throughput, which one frame in flight does not show: the highest input rate the cuda
# node keeps up with (< 5% dropped), every output and a robot's subscribers, against
# the network's own rate (bench_cuda.json), and every output again with overlap_publish
# (a frame published while the next one is computed): whether a GPU node is bound by its
# network is read off these. One JSON for all (OUT takes 8 files), {name: T.json},
# rewritten after each search so that a run cut short keeps the searches it finished.
max_rate() {  # max_rate NAME [replay options...]
  local name=$1
  shift
  env FASTDDS_DEFAULT_PROFILES_FILE="$PROFILE_FILE" segsafe replay --bag "$SCRATCH/bag" \
    --config config/detector.yaml \
    --node-process --find-max-rate --search-seconds 3 --search-trials 8 \
    --param "input_size=[512,1024]" --param "device=$DEVICE" "$@" \
    --out "$SCRATCH/replay_$name/T.json" &&
    python -P - "$SCRATCH" "$OUT/replay_max_rates.json" <<'PY'
import json, pathlib, sys
found = sorted(pathlib.Path(sys.argv[1]).glob("replay_*/T.json"))
runs = {p.parent.name.removeprefix("replay_"): json.loads(p.read_text()) for p in found}
pathlib.Path(sys.argv[2]).write_text(json.dumps(runs, indent=1))
PY
}
export -f max_rate
step "highest input rate on cuda, every output" max_rate cuda_max_rate
step "highest input rate on cuda, every output, overlap_publish" max_rate cuda_max_rate_overlap \
  --param overlap_publish=true
step "highest input rate on cuda, a robot's subscribers" max_rate cuda_max_rate_robot \
  --outputs safety,hazards,hazard_overlay_compressed --param safety_embeds_maps=false
step "node bench on cuda, the node in its own process, config/fastdds_same_host.xml" \
  "${profile[@]}" "${node_bench[@]}" --node-process --sizes 512x1024,1024x2048 \
  --output-scales 1,0.5 --frames 16 --param "device=$DEVICE" \
  --out "$OUT/node_cuda_process_same_host.json"
# fp32: at one frame a pass the H100 ran the bare network faster in fp32.
step "node bench on cuda, fp32" "${node_bench[@]}" --sizes 512x1024,1024x2048 \
  --output-scales 1,0.5 --frames 16 --param "device=$DEVICE" --param fp16=false \
  --out "$OUT/node_cuda_fp32.json"
step "model bench on cuda, 512x1024" \
  segsafe bench --device "$DEVICE" --height 512 --width 1024 --repeats 20 --out "$OUT/bench_cuda.json"
if ((${#skipped[@]})); then
  say "not run (past the deadline): ${skipped[*]}"
fi
if ((${#failed[@]})); then
  say "done in ${SECONDS} s: $OUT; failed: ${failed[*]}"
  exit 1
fi
say "done in ${SECONDS} s: $OUT"
