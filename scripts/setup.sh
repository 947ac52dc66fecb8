#!/usr/bin/env bash
# Builds the development environment: .venv/ (pinned PyTorch, ROS 2 Kilted wheels, colcon,
# rosbags, test tools), the two path fix-ups the ROS wheels' CMake files expect, and the
# colcon build/ and install/ spaces. Idempotent: each step records a stamp (keyed on its
# inputs) only after it succeeded, so an interrupted run is repaired by the next one.
#
# Offline, on a machine with no package index but its own PyTorch (the GPU machine lent
# to some sessions): SEGSAFE_WHEELS=DIR takes the ROS 2 wheels, colcon and rosbags from
# DIR (made here by scripts/device_wheels.sh, for that machine's CPython; or its archive
# DIR.tar.xz, unpacked to DIR first) and everything else from the packages of the
# interpreter that runs (PYTHON, default python3).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
STAMPS="$VENV/.stamps"

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

# --- prerequisites, reported by name -------------------------------------------------
WHEELS=${SEGSAFE_WHEELS:-}
PY=${PYTHON:-}
if [ -n "$WHEELS" ]; then
  PY=$(command -v "${PY:-python3}") || die "no python3 here; set PYTHON"
  if [ -f "$WHEELS" ]; then  # device_wheels.sh's archive: unpacked beside it, once
    folder=${WHEELS%.tar.xz}
    [ "$folder" != "$WHEELS" ] || die "SEGSAFE_WHEELS=$WHEELS is a file but not a .tar.xz of wheels (scripts/device_wheels.sh makes one)"
    packed=$(sha256sum <"$WHEELS" | cut -c1-16)
    if [ "$(cat "$folder/.unpacked-from" 2>/dev/null)" != "$packed" ]; then
      say "unpacking $WHEELS"
      rm -rf "$folder" "$folder.tmp"
      "$PY" -c '
import sys, tarfile
with tarfile.open(sys.argv[1]) as archive:
    # "data": nothing outside the folder, no links or devices (Python >= 3.11.4)
    kind = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    archive.extractall(sys.argv[2], **kind)' "$WHEELS" "$folder.tmp" \
        || die "cannot unpack $WHEELS (truncated? make it again with scripts/device_wheels.sh)"
      echo "$packed" >"$folder.tmp/.unpacked-from"
      mv "$folder.tmp" "$folder"
    fi
    WHEELS=$folder
  fi
  tag=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
  compgen -G "$WHEELS/ros_rclpy-*-$tag-*.whl" >/dev/null \
    || die "no ROS 2 wheels for $tag in $WHEELS: run scripts/device_wheels.sh $("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') where pip can reach PyPI"
  # What setup.py needs, and pytest: offline these come from the interpreter itself.
  lacking=$("$PY" -c '
import importlib.util as u
names = "torch torchvision numpy PIL cv2 yaml safetensors scipy tqdm matplotlib pytest setuptools"
print(" ".join(n for n in names.split() if u.find_spec(n) is None))')
  [ -z "$lacking" ] || die "$PY lacks $lacking, which offline setup takes from the interpreter (import names)"
elif [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && \
       "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      PY=$(command -v "$cand"); break
    fi
  done
fi
[ -n "$PY" ] || die "Python 3.11 not found (the ROS 2 Kilted wheels are built for CPython 3.11); set PYTHON=/path/to/python3.11"
missing=()
for tool in cmake gcc g++; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if ! command -v make >/dev/null 2>&1; then
  # colcon's CMake builds run with any generator CMake has
  if command -v ninja >/dev/null 2>&1; then export CMAKE_GENERATOR=Ninja; else missing+=(make); fi
fi
[ -n "$WHEELS" ] || command -v git >/dev/null 2>&1 || missing+=(git)  # offline: a copy, not a clone
if [ -n "$WHEELS" ]; then
  "$PY" -c 'import venv' 2>/dev/null || missing+=("python3-venv")
else
  "$PY" -c 'import venv, ensurepip' 2>/dev/null || missing+=("python3-venv")
fi
[ -f "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] || missing+=("the Python headers (Python.h) of $PY")
[ ${#missing[@]} -eq 0 ] || die "missing prerequisites: ${missing[*]} (e.g. apt-get install ${missing[*]})"

hash_of() { cat "$@" | sha256sum | cut -c1-16; }
stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp_set() { mkdir -p "$STAMPS"; echo "$2" > "$STAMPS/$1"; }

# --- virtual environment ------------------------------------------------------------
if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  say "creating .venv with $PY"
  rm -rf "$VENV"
  if [ -n "$WHEELS" ]; then
    # Over the interpreter's own packages (it may itself be a venv, which
    # --system-site-packages would skip): its site dirs are added to the new one's, .pth
    # files and all, after the venv's own.
    "$PY" -m venv --without-pip "$VENV"
    "$PY" -c 'import site; print("".join(f"import site; site.addsitedir({d!r})\n" for d in site.getsitepackages()))' \
      >"$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_base_packages.pth"
  else
    "$PY" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
export PIP_PROGRESS_BAR=off

if [ -n "$WHEELS" ]; then
  # Exactly the folder's wheels (device_wheels.sh resolved them); PyTorch and the rest
  # are the interpreter's own.
  h=$(ls "$WHEELS" | sha256sum | cut -c1-16)
  if ! stamp_ok wheels "$h"; then
    say "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS (offline)"
    "${PIP[@]}" install -q --no-index --no-deps "$WHEELS"/*.whl
    stamp_set wheels "$h"
  fi
else
  h=$(hash_of requirements/torch.txt)
  if ! stamp_ok torch "$h"; then
    say "installing PyTorch (from local disk where available; ~1.5 min)"
    "${PIP[@]}" install -q -r requirements/torch.txt
    stamp_set torch "$h"
  fi
  h=$(hash_of requirements/ros.txt requirements/dev.txt)
  if ! stamp_ok deps "$h"; then
    say "installing ROS 2 Kilted wheels, colcon and Python dependencies"
    "${PIP[@]}" install -q -r requirements/ros.txt -r requirements/dev.txt -c requirements/torch.txt
    stamp_set deps "$h"
  fi
fi
h=$(hash_of setup.py pyproject.toml)
if ! stamp_ok editable "$h"; then
  say "pip install -e . (core, training, segsafe CLI)"
  "${PIP[@]}" install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
  stamp_set editable "$h"
fi

# --- path fix-ups the ROS wheels' CMake exports expect ------------------------------
# The wheels were built under /opt/python/cpXY-cpXY and their exported CMake targets
# name its include dir and, for NumPy's headers, its site-packages; point both at this
# interpreter and the site-packages that holds NumPy (the venv's, or offline the
# interpreter's own).
mapfile -t paths < <("$VENV/bin/python" -c '
import os, sys, sysconfig, numpy
site = os.path.dirname(os.path.dirname(numpy.__file__))
print("cp%d%d" % sys.version_info[:2], "%d.%d" % sys.version_info[:2],
      sysconfig.get_paths()["include"], site, os.path.relpath(numpy.get_include(), site), sep="\n")')
[ ${#paths[@]} -eq 5 ] || die "cannot read the interpreter's include dir and NumPy's location from $VENV/bin/python"
tag=${paths[0]} pyver=${paths[1]} py_include=${paths[2]} numpy_site=${paths[3]} numpy_rel=${paths[4]}
OPT=/opt/python/$tag-$tag
link() {  # link TARGET NAME: (re)point NAME at TARGET unless it already does
  if [ "$(readlink "$2" 2>/dev/null)" != "$1" ]; then
    if [ -e "$2" ] && [ ! -L "$2" ]; then die "$2 exists and is not a symlink; move it away"; fi
    mkdir -p "$(dirname "$2")" 2>/dev/null || die "cannot create $(dirname "$2") (run as root or create it writable)"
    ln -sfn "$1" "$2"
  fi
}
link "$py_include" "$OPT/include/python$pyver"
link "$numpy_site" "$OPT/lib/python$pyver/site-packages"

# --- colcon build -------------------------------------------------------------------
# CMake refuses exported include dirs inside the source tree, and .venv/ lives there: hand
# it NumPy's headers through the /opt/python site-packages link made above.
numpy_include=$OPT/lib/python$pyver/site-packages/$numpy_rel
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
say "colcon build"
colcon --log-base "$ROOT/log" build --base-paths "$ROOT" --build-base "$ROOT/build" \
  --install-base "$ROOT/install" --symlink-install \
  --cmake-args -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF \
    -DPython3_NumPy_INCLUDE_DIR="$numpy_include" \
  --event-handlers console_cohesion- summary+ status- >"$ROOT/log/colcon-build.txt" 2>&1 \
  || { tail -40 "$ROOT/log/colcon-build.txt" >&2; die "colcon build failed (full log: log/colcon-build.txt)"; }
say "ready: source scripts/env.sh && source install/setup.bash"
