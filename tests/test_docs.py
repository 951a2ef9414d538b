"""The documentation: it builds with warnings as errors, its API reference covers every public name,
and the getting-started page runs.

The build is the one ``scripts/docs.sh`` runs (Sphinx, autodoc + napoleon, myst-nb with notebook
execution off), into a temporary folder, with one process (``-j 1``). The API pages are written by
``docs/conf.py`` from the ``__all__`` lists at every build; the check here recomputes the public
modules and their names on its own and looks for each name's anchor in the built HTML, so a name
that is in an ``__all__`` but missing from the reference (or a page that failed to document it)
fails. Skipped, with the reason, when Sphinx (the ``docs`` extra) is not installed.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# The modules the issue names: the reference must hold at least these, whatever else is public.
REQUIRED_MODULES = {
    "obcjax",
    "obcjax.kernels",
    "obcjax.transforms",
    "obcjax.calibration",
    "obcjax.specs",
    "obcjax.rules",
    "obcjax.export",
    "obcjax.fileio",
    "obcjax.allocation",
    "obcjax.opq",
    "obcjax.fit",
    "obcjax.admm",
    "obcjax.training",
    "obcjax.activations",
    "obcjax.pipeline",
    "obcjax.quant",
    "obcjax.stats",
}


def _public_modules() -> list[str]:
    """obcjax, every module directly under it not starting with '_', and every module named in a
    public module's ``__all__`` (the rule docs/_apigen.py documents, recomputed here)."""
    import obcjax

    found = {"obcjax"}
    for info in pkgutil.iter_modules(obcjax.__path__, "obcjax."):
        if not info.name.split(".")[-1].startswith("_"):
            found.add(info.name)
    todo = list(found)
    while todo:
        mod = importlib.import_module(todo.pop())
        for name in getattr(mod, "__all__", None) or ():
            obj = getattr(mod, name)
            if (
                isinstance(obj, types.ModuleType)
                and obj.__name__.startswith("obcjax.")
                and obj.__name__ not in found
            ):
                found.add(obj.__name__)
                todo.append(obj.__name__)
    return sorted(found)


def _expected_names(modname: str) -> list[str]:
    """``__all__``, or for a module without one the functions and classes it defines."""
    mod = importlib.import_module(modname)
    names = getattr(mod, "__all__", None)
    if names is not None:
        return list(names)
    return [
        n
        for n, obj in vars(mod).items()
        if not n.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == modname
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("sphinx", reason="Sphinx is not installed (pip install -e '.[docs]')")
    pytest.importorskip("myst_nb", reason="myst-nb is not installed (pip install -e '.[docs]')")
    pytest.importorskip(
        "sphinx_book_theme", reason="sphinx-book-theme is not installed (pip install -e '.[docs]')"
    )
    out = tmp_path_factory.mktemp("docs")
    cmd = [
        sys.executable, "-m", "sphinx",
        "-W", "--keep-going", "-b", "html", "-q", "-j", "1",
        "-d", str(out / "doctrees"), str(DOCS), str(out / "html"),
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, (
        f"the docs do not build with warnings as errors ({seconds:.0f} s):\n"
        f"{proc.stderr[-20000:]}\n{proc.stdout[-5000:]}"
    )
    return out / "html"


def test_docs_build_without_warnings(built):
    for page in ("index", "getting-started", "architecture", "api/index"):
        assert (built / f"{page}.html").is_file(), page
    for method in ("obc", "gptq", "opq", "fitcompress", "admm"):
        assert (built / "methods" / f"{method}.html").is_file(), method
    # the notebooks are rendered (as stored: the build does not execute them)
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert (built / "notebooks" / f"{nb.stem}.html").is_file(), nb.name


def test_api_reference_covers_every_public_name(built):
    modules = _public_modules()
    assert REQUIRED_MODULES <= set(modules), REQUIRED_MODULES - set(modules)
    missing = []
    for modname in modules:
        page = built / "api" / f"{modname}.html"
        if not page.is_file():
            missing.append(f"{modname}: no page api/{modname}.html")
            continue
        html = page.read_text(encoding="utf-8")
        if f'id="module-{modname}"' not in html:
            missing.append(f"{modname}: no module anchor")
        mod = importlib.import_module(modname)
        for name in _expected_names(modname):
            obj = getattr(mod, name)
            if isinstance(obj, types.ModuleType):
                # a submodule in __all__: linked from this page, documented on its own page
                ok = f"{obj.__name__}.html" in html and obj.__name__ in modules
            else:
                ok = f'id="{modname}.{name}"' in html
            if not ok:
                missing.append(f"{modname}.{name}")
    assert not missing, f"names of a public __all__ missing from the API reference: {missing}"


@pytest.mark.parametrize("name, min_blocks", [("index.md", 1), ("getting-started.md", 8)])
def test_page_code_runs(name, min_blocks, tmp_path, monkeypatch):
    """Every ``python`` block of a page that is meant to run, in order, in one namespace.

    The method pages' blocks are illustrations that need a trained model; they are not run.
    """
    sybil = pytest.importorskip("sybil", reason="sybil is not installed (pip install -e '.[dev]')")
    from sybil.parsers.markdown import PythonCodeBlockParser

    monkeypatch.chdir(tmp_path)  # anything the page writes lands here
    page = DOCS / name
    document = sybil.Sybil(parsers=[PythonCodeBlockParser()], path=str(DOCS)).parse(page)
    examples = list(document.examples())
    assert len(examples) >= min_blocks, f"{name} lost its code blocks"
    for example in examples:
        try:
            example.evaluate()
        except Exception as e:
            raise AssertionError(f"{page.name}, block at line {example.line}: {e!r}") from e
