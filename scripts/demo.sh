#!/usr/bin/env bash
# Install into .venv and run the main job on the built-in default (LeNet-5 on scikit-learn's
# digits): train or load the dense model, calibrate, compress with OBC, print the before/after
# table and write a plot under runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MPLBACKEND=Agg
.venv/bin/obcjax compress "$@"
