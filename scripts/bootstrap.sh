#!/usr/bin/env bash
# Sets up a fresh machine for fasttrain: system packages, a virtual environment in .venv with the
# pinned torch/torchvision, and the project with its extras (ffcv, dali, dev). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
EXTRAS=${FASTTRAIN_EXTRAS:-dev,ffcv,dali}
APT_PKGS="pkg-config libopencv-dev libturbojpeg0-dev dataset-fashion-mnist"

missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "[bootstrap] apt-get install$missing"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip wheel setuptools
# torch first and pinned: ffcv's build and every extra must see this exact build.
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
echo "[bootstrap] ready: $(.venv/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')"
