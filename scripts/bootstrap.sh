#!/usr/bin/env bash
# Sets up a fresh machine for fasttrain: system packages, a virtual environment in .venv with the
# pinned torch/torchvision, and the project with its extras (ffcv, dali, dev, wandb, analysis). Safe to run again.
# FASTTRAIN_VERSIONS=oldest: .venv-oldest instead, with the oldest torch/torchvision/accelerate setup.py
# supports and no ffcv/dali (what CI tests the lower end with).
# FASTTRAIN_NEEDS_GIB: the free disk a new environment asks for first (default 9).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
if [ "${FASTTRAIN_VERSIONS:-newest}" = oldest ]; then
  VENV=.venv-oldest; PINS="torch==2.11.0 torchvision==0.26.0 accelerate==1.10.1"
  EXTRAS=${FASTTRAIN_EXTRAS:-dev,analysis}
else
  VENV=.venv; PINS="torch==2.14.1 torchvision==0.29.1"
  EXTRAS=${FASTTRAIN_EXTRAS:-dev,ffcv,dali,wandb,analysis}
fi
# a new environment holds torch with its CUDA libraries (.venv 7.2 GiB, .venv-oldest 5.5 GiB) and pip
# unpacks the downloaded wheels beside it: refuse before anything is installed
NEEDS_GIB=${FASTTRAIN_NEEDS_GIB:-9}
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  free_gib=$(( $(df -Pk . | awk 'NR==2 {print $4}') / 1048576 ))
  if [ "$free_gib" -lt "$NEEDS_GIB" ]; then
    echo "[bootstrap] error: $free_gib GiB free under $PWD; a new $VENV needs about $NEEDS_GIB GiB (torch and its CUDA libraries): free some and run again" >&2
    exit 1
  fi
fi
# build deps of ffcv; the demo's data; real photographs for the loader benchmarks and their test
APT_PKGS="pkg-config libopencv-dev libturbojpeg0-dev dataset-fashion-mnist lomiri-wallpapers-16.04"

missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "[bootstrap] apt-get install$missing"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

pip_install() {  # quiet, less the machine's notes about local index folders that do not exist
  "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install --upgrade pip wheel setuptools
# torch first and pinned: ffcv's build and every extra must see this exact build.
pip_install $PINS
pip_install -e ".[$EXTRAS]" $PINS
echo "[bootstrap] $VENV ready: $("$VENV/bin/python" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')"
