#!/usr/bin/env bash
# The GPU kit (benchmarks/gpu_kit.py): on a GPU node, proves the main paths run and measures them in
# about 8 minutes, one results folder (default benchmarks/results/gpu_<gpu>). Extra arguments go to
# the kit, e.g. --budget 300 or --parts selftest,step_cost. Needs torch, torchvision, accelerate,
# timm, pydantic, pyyaml, tqdm, matplotlib, pillow; DALI and ffcv are used where installed.
# BUNDLE=DIR puts what `python -m benchmarks.gpu_bundle DIR` packed elsewhere (pydantic, ffcv and the
# libraries ffcv links) on the import and library paths, for a node that reaches no package index.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${BUNDLE:-}" ]; then
  bundle=$(cd "$BUNDLE" && pwd) || exit 2
  export PYTHONPATH="$bundle/site${PYTHONPATH:+:$PYTHONPATH}" LD_LIBRARY_PATH="$bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
out=()
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then out=(--out "$1"); shift; fi
exec "$PY" -m benchmarks.gpu_kit "${out[@]}" "$@"
