#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (it has torch, timm, lightning, numpy, scipy, matplotlib, pytest,
# pytest-xdist but no package registry): cp312 manylinux builds of av, kornia (+ kornia_rs), scikit-video, decord,
# yt-dlp, and torchsort's source (built there against its torch by scripts/gpu_check.sh). POT (33 MB) is left out:
# with av it would not fit in the 64 MiB that travel, and only tests/test_sinkhorn.py (an oracle) needs it.
#   make gpu-wheels            # -> gpu-wheels/ (git-ignored; name it in the device call's carry)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${GPU_WHEELS_DIR:-gpu-wheels}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$DIR"
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLAT[@]}" -d "$DIR" av==18.1.0 kornia==0.9.0 kornia_rs==0.2.0 scikit-video==1.1.11 \
  decord==0.6.0 yt-dlp
# torchsort ships as source only; its metadata step needs torch, hence no build isolation (the venv has torch)
quiet "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary=:all: --no-build-isolation \
  -d "$DIR" torchsort==0.1.10
total=$(du -sm "$DIR" | cut -f1)
ls -l "$DIR"
echo "gpu-wheels: $total MiB in $DIR (what travels to the device is capped at 64 MiB, the repository included)"
[ "$total" -le 60 ] || { echo "gpu-wheels: over 60 MiB: drop a wheel (decord is the least needed)" >&2; exit 1; }
