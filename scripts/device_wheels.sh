#!/usr/bin/env bash
# Wheels for a machine that cannot reach a package index: the GPU machine lent to some
# sessions, whose image has CPython 3.12 with PyTorch, NumPy, OpenCV, SciPy, pytest, ...
# but no ROS 2. Puts the ROS 2 Kilted wheels and colcon (requirements/ros.txt) and the bag
# tools (rosbags), with everything they need that the image lacks, built for that
# CPython, into a git-ignored folder, and packs them into one archive beside it
# (DIR.tar.xz), which is what travels with the working tree. There:
#   SEGSAFE_WHEELS=.whl.tar.xz bash scripts/setup.sh && bash scripts/gpu_check.sh "$OUT/gpu"
# Usage (here, after make setup): bash scripts/device_wheels.sh [PYTHON_VERSION] [DIR]
# (defaults 3.12 and .whl).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-3.12}
DIR=${2:-.whl}
ARCHIVE="$DIR.tar.xz"
# The working tree and the wheels travel together to the GPU machine, at most 64 MiB:
# what its image already has stays out (NumPy alone is 16 MB). Another machine may lack
# some: SEGSAFE_PROVIDED="" keeps every wheel (names as in wheel files).
PROVIDED=${SEGSAFE_PROVIDED-numpy pyyaml setuptools pygments pytest pytest_cov coverage
  packaging pyparsing python_dateutil typing_extensions pluggy iniconfig tzdata}
LIMIT=$((64 << 20))

say() { printf '\033[1m[device_wheels]\033[0m %s\n' "$*"; }
# shellcheck disable=SC1091
source scripts/env.sh
rm -rf "$DIR"
mkdir -p "$DIR"

# EmPy (rosidl's template engine, via colcon-core) is published as source only, and pip
# fetches wheels alone for another Python: build its (pure-Python) wheel here first.
empy=$(python -c 'import importlib.metadata as m; print(m.version("empy"))')
say "building EmPy $empy's wheel"
python -m pip wheel -q --no-deps -w "$DIR" "empy==$empy"

rosbags=$(grep -oE '^rosbags==[^ ]+' requirements/dev.txt)
say "downloading the ROS 2 wheels, colcon and $rosbags for CPython $VERSION"
python -m pip download -q --only-binary=:all: --implementation cp --python-version "$VERSION" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --find-links "$DIR" -d "$DIR" -r requirements/ros.txt "$rosbags"
for name in $PROVIDED; do rm -f "$DIR/$name"-*.whl; done

# Each wheel is a zip deflated file by file; stored uncompressed inside one xz archive
# the same wheels take about half the bytes (51 -> 27 MiB on 2026-12-07), and the
# archive with the tracked files must fit in what travels (63 of 64 MiB as plain wheels).
say "packing them into $ARCHIVE (a minute or two)"
python - "$DIR" "$ARCHIVE.tmp" <<'EOF'
import io, pathlib, sys, tarfile, zipfile

folder, target = pathlib.Path(sys.argv[1]), sys.argv[2]
with tarfile.open(target, "w:xz", preset=6) as archive:
    for wheel in sorted(folder.glob("*.whl")):
        stored = io.BytesIO()
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as dst:
            for member in src.infolist():
                entry = zipfile.ZipInfo(member.filename, member.date_time)
                entry.external_attr = member.external_attr  # permissions (scripts)
                dst.writestr(entry, src.read(member))  # ZipInfo's default: stored
        entry = tarfile.TarInfo(wheel.name)
        entry.size, entry.mtime, entry.mode = stored.tell(), int(wheel.stat().st_mtime), 0o644
        stored.seek(0)
        archive.addfile(entry, stored)
EOF
mv "$ARCHIVE.tmp" "$ARCHIVE"  # a killed run leaves no archive that looks whole

size=$(du -cb "$ARCHIVE" | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
say "$(ls "$DIR"/*.whl | wc -l) wheels, $(($(du -cb "$DIR"/*.whl | tail -1 | cut -f1) >> 20)) MiB; packed $((size >> 20)) MiB, with the tracked files $(((size + tree) >> 20)) MiB of the 64 MiB that travel"
if ((size + tree > LIMIT)); then
  say "more than the GPU machine takes: leave out more of what it has (SEGSAFE_PROVIDED)"
  [ -n "${SEGSAFE_PROVIDED+set}" ] || exit 1  # only the GPU machine has that limit
fi
say "there: SEGSAFE_WHEELS=$ARCHIVE bash scripts/setup.sh (carry $ARCHIVE)"
