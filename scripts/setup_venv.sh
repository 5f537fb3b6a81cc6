#!/usr/bin/env bash
# Create or refresh .venv for wtours. Idempotent: a second run with nothing changed takes a second.
#
#   PYTHON=python3.12 scripts/setup_venv.sh     # choose the interpreter (default: python3)
#   WTOURS_VENV=/path/venv scripts/setup_venv.sh # choose the venv folder (default: .venv)
#
# torch is pinned to the builds that lie on our machines' disk; torchsort is built from source
# against that torch (--no-build-isolation), with nvcc hidden from PATH when no usable GPU is present
# (its setup.py builds the CUDA op whenever nvcc is found, which fails on CPU-only machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${WTOURS_VENV:-.venv}
TORCH_PIN=${WTOURS_TORCH_PIN:-"torch==2.14.1 torchvision==0.29.1"}
TORCHSORT_PIN=${WTOURS_TORCHSORT_PIN:-"torchsort==0.1.10"}

stamp_of() { cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -c1-16; echo "$TORCH_PIN $TORCHSORT_PIN"; }
want=$(stamp_of)
if [ -x "$VENV/bin/python" ] && [ -f "$VENV/.wtours-stamp" ] && [ "$(cat "$VENV/.wtours-stamp")" = "$want" ]; then
  exit 0
fi

echo "[setup] preparing $VENV with $($PY --version 2>&1)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip's warnings about the machine's empty local index folders are noise: filter them out.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip() { quiet "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip setuptools wheel
# shellcheck disable=SC2086
pip install -q $TORCH_PIN
pip install -q -e ".[test]"

if ! "$VENV/bin/python" -c "import torchsort" 2>/dev/null; then
  echo "[setup] building torchsort from source (about a minute)" >&2
  if "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    # shellcheck disable=SC2086
    pip install -q --no-build-isolation --no-deps $TORCHSORT_PIN
  else
    # Hide nvcc (and CUDA_HOME) so that only the CPU extension is compiled.
    clean_path=$(printf '%s' "$PATH" | tr ':' '\n' | while read -r d; do
      [ -n "$d" ] && [ ! -x "$d/nvcc" ] && printf '%s:' "$d"; done)
    # shellcheck disable=SC2086
    quiet env -u CUDA_HOME -u CUDA_PATH PATH="${clean_path%:}" \
      "$VENV/bin/python" -m pip --disable-pip-version-check install -q --no-build-isolation --no-deps $TORCHSORT_PIN
  fi
fi
"$VENV/bin/python" -c "import torch, timm, lightning, kornia, av, ot, yt_dlp, wtours" \
  || { echo "[setup] the environment in $VENV does not import; see the messages above" >&2; exit 1; }
stamp_of > "$VENV/.wtours-stamp"
echo "[setup] $VENV ready" >&2
