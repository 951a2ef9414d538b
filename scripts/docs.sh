#!/usr/bin/env bash
# Build the documentation site into docs/_build/html (open docs/_build/html/index.html).
#
# Sphinx with autodoc/autosummary + napoleon: the API reference comes from the docstrings, its
# pages are written from every public __all__ at each build (docs/_apigen.py). myst-nb renders the
# Markdown pages and the notebooks as stored (they are never executed here). Warnings are errors.
# Needs the docs extra; scripts/setup.sh installs it into .venv. Extra arguments go to sphinx-build
# (e.g. -E to rebuild everything).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ ! -x "$PY" ] || ! "$PY" -c "import sphinx, myst_nb, sphinx_book_theme" 2>/dev/null; then
  bash scripts/setup.sh
fi
export JAX_PLATFORMS=cpu MPLBACKEND=Agg
"$PY" -m sphinx -W --keep-going -j 1 -b html -d docs/_build/doctrees docs docs/_build/html "$@"
echo "docs: docs/_build/html/index.html"
