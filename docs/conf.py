"""Sphinx configuration for the obcjax documentation (built by ``scripts/docs.sh``)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS))

# autodoc imports the package; keep JAX quiet and on the CPU while it does
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")

import _apigen  # noqa: E402

import obcjax  # noqa: E402

# The API pages are written from the package's ``__all__`` lists every time Sphinx starts, before
# it looks for source files: a new public name needs no edit here.
_apigen.write_pages(DOCS / "api")

project = "obcjax"
author = "obcjax authors"
copyright = "2026, obcjax authors"
release = version = obcjax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "README.md"]

# -- autodoc / autosummary / napoleon ------------------------------------------------------------
autosummary_generate = False  # the pages come from _apigen, not from autosummary's stub writer
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = False  # True re-parses every source file per object: slow
autodoc_default_options = {"exclude-members": "__init__, __new__"}
autodoc_class_signature = "mixed"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True
# True would print annotations as ``jax.jaxlib._jax.Array``; the class signature shows them.
napoleon_attr_annotations = False
add_module_names = False
python_display_short_literal_types = True

# -- myst-nb --------------------------------------------------------------------------------------
nb_execution_mode = "off"  # notebooks are rendered as stored; the test command runs them (nbmake)
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# -- HTML -----------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "obcjax"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path: list[str] = []


def _drop_inherited_data_doc(app, what, name, obj, options, lines):
    # A constant with no docstring of its own (``LAYER_TYPES = {...}``) would otherwise show the
    # docstring of its type (``dict``'s), which is not about it and is not valid reST.
    if what in ("data", "attribute") and lines:
        own = getattr(obj, "__doc__", None)
        if own is not None and own == getattr(type(obj), "__doc__", None):
            lines.clear()


_FIELD_SECTIONS = {"Args:", "Arguments:", "Attributes:", "Parameters:", "Keyword Args:"}
_GROUPED_NAMES = re.compile(r"^(\s+)(\w+(?:\s*[,/]\s*\w+)+)(\s*:(?:\s.*)?)$")


def _join_grouped_field_names(app, what, name, obj, options, lines):
    # Google-style entries that describe several names at once ("n, m: static ..." or
    # "chunk_rows / memory_bytes: ...") become ":param n, m:", which Sphinx splits at the space
    # into a *type* "n," and a name "m". Joining the names without whitespace (a zero-width space
    # after each separator) keeps them together as one name. Runs before napoleon.
    header = None
    entry = None
    for i, line in enumerate(lines):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped in _FIELD_SECTIONS:
            header, entry = indent, None
            continue
        if header is None or not stripped:
            continue
        if indent <= header:
            header = None
            continue
        if entry is None:
            entry = indent
        m = _GROUPED_NAMES.match(line)
        if indent == entry and m:
            joined = re.sub(r"\s*([,/])\s*", "\\1\u200b", m.group(2))
            lines[i] = m.group(1) + joined + m.group(3)


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    # NamedTuple fields are documented in the class's Attributes section and in its signature;
    # their generated "Alias for field number N" entries are noise.
    doc = getattr(obj, "__doc__", None)
    if what in ("class", "exception") and isinstance(doc, str):
        if doc.startswith("Alias for field number"):
            return True
    return None


def setup(app):
    app.connect("autodoc-process-docstring", _drop_inherited_data_doc)
    app.connect("autodoc-process-docstring", _join_grouped_field_names, priority=100)
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
