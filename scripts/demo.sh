#!/usr/bin/env bash
# The demo main job on real photos: Fashion-MNIST JPEG folders (made once), then pretraining and
# linear evaluation with the given recipe (default: SelfCon). Run scripts/bootstrap.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=${1:-recipes/demo_selfcon.yaml}
shift || true
.venv/bin/python -m fasttrain.demo_data fashion_mnist data/fashion_mnist --train-per-class 1000
# one CPU process needs no launcher, and without one the exit status is the trainer's own (docs/running.md)
exec .venv/bin/python fasttrain/run.py "$RECIPE" "$@"
