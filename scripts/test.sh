#!/usr/bin/env bash
# Install into .venv and run the whole test suite (what CI runs): tests/, the python blocks of
# README.md and the docstring examples under obcjax/ (both through sybil, see conftest.py), and
# the notebooks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MPLBACKEND=Agg
.venv/bin/python -m pytest -n "${OBCJAX_TEST_WORKERS:-2}" --dist loadfile tests README.md obcjax --nbmake notebooks "$@"
