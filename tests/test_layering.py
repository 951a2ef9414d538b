"""Layering: outside ``obcjax/kernels/`` nothing reaches into the kernels' private names.

The kernels' public surface is what ``obcjax.kernels`` and its public submodules export under
names without a leading underscore. Everything else -- ``_greedy_jit``, ``_rebuild_chol``, the
private module ``obcjax.kernels._engine`` as a whole -- may change with any kernel change, so a
module that uses it silently diverges from the kernels (issue 16: ``transforms.py`` once carried a
replay of the kernels' recipes built from their private functions).

The check reads the source (AST, nothing is imported) of every ``.py`` file under ``obcjax/``,
``experiments/`` and ``tests/`` and flags:

* ``from obcjax.kernels[.<module>] import _name`` and the same as a relative import;
* any import of a private kernel module (``obcjax.kernels._engine``, ``from obcjax.kernels import
  _engine``);
* ``alias._name`` where ``alias`` is bound to ``obcjax.kernels`` or one of its submodules, and
  ``getattr`` / ``setattr`` / ``monkeypatch.setattr`` of such an alias with a private name.

Exempt: ``obcjax/kernels/`` itself and ``tests/kernels/``, the kernels' own white-box unit tests
(which pin internal schedules and spy on internal pieces on purpose). ``benchmarks/`` belongs to
the benchmark suite and is reported, not checked, here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("obcjax", "experiments", "tests")
EXEMPT = ("obcjax/kernels/", "tests/kernels/")
KERNELS = "obcjax.kernels"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _in_kernels(module: str | None) -> bool:
    return module is not None and (module == KERNELS or module.startswith(KERNELS + "."))


def _private_module(module: str) -> bool:
    return any(_private(part) for part in module.split("."))


def _absolute(module: str | None, level: int, package: str) -> str | None:
    """The absolute module of ``from <level dots><module> import ...`` inside ``package``."""
    if level == 0:
        return module
    parts = package.split(".")
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    return ".".join([*parts, module] if module else parts)


def violations(source: str, package: str = "") -> list[str]:
    """Private kernel names that ``source`` (a module of ``package``) reaches, one line each."""
    tree = ast.parse(source)
    found: list[str] = []
    aliases: set[str] = set()  # names bound to obcjax.kernels or one of its modules
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if not _in_kernels(a.name):
                    if a.name == "obcjax" and a.asname is None:
                        aliases.add("obcjax.kernels")  # `obcjax.kernels._x` via `import obcjax`
                    continue
                if _private_module(a.name):
                    found.append(f"line {node.lineno}: import {a.name} (a private kernel module)")
                aliases.add(a.asname or a.name)
                if a.asname is None:
                    aliases.add(KERNELS)
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node.module, node.level, package)
            if module == "obcjax":
                for a in node.names:
                    if a.name == "kernels":
                        aliases.add(a.asname or a.name)
                continue
            if not _in_kernels(module):
                continue
            if _private_module(module):
                names = ", ".join(a.name for a in node.names)
                found.append(f"line {node.lineno}: from {module} import {names} (a private "
                             "kernel module)")
                continue
            for a in node.names:
                if _private(a.name):
                    found.append(f"line {node.lineno}: from {module} import {a.name}")
                else:
                    # `from obcjax.kernels import exactobs` binds a module: watch its attributes
                    aliases.add(a.asname or a.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = ast.unparse(node.value)
            if base in aliases:
                found.append(f"line {node.lineno}: {base}.{node.attr}")
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            fn = ast.unparse(node.func)
            target, name = node.args[0], node.args[1]
            if (
                fn.split(".")[-1] in ("getattr", "setattr", "delattr", "hasattr")
                and ast.unparse(target) in aliases
                and isinstance(name, ast.Constant)
                and isinstance(name.value, str)
                and _private(name.value)
            ):
                found.append(f"line {node.lineno}: {fn}({ast.unparse(target)}, {name.value!r})")
    return found


def _files():
    for top in CHECKED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith(EXEMPT) and "/." not in rel:
                yield rel


def _package(rel: str) -> str:
    """The package a file's relative imports resolve against."""
    return ".".join(rel.split("/")[:-1])


def test_checker_flags_every_form():
    bad = [
        "import obcjax.kernels._engine",
        "import obcjax.kernels.exactobs as E",
        "from obcjax.kernels import _engine",
        "from obcjax.kernels._engine import phase_plan",
        "from obcjax.kernels.exactobs import _greedy_jit, Result",
        "from obcjax import kernels as K",
        "from obcjax.kernels import exactobs",
        "import obcjax",
        "E._rebuild_chol",
        "K._solve",
        "exactobs._block_row(w)",
        "obcjax.kernels._private",
        'getattr(exactobs, "_greedy_jit")',
        'monkeypatch.setattr(K, "_x", 1)',
    ]
    flagged = {int(v.split(":")[0].split()[1]) for v in violations("\n".join(bad))}
    binders = {2, 6, 7, 8}  # (lines, 1-based) that only bind a name
    assert flagged == set(range(1, len(bad) + 1)) - binders, flagged
    rel = "from .kernels.exactobs import _greedy_jit\nfrom ..kernels import _engine\n"
    assert len(violations(rel, "obcjax")) == 1
    assert len(violations(rel, "obcjax.zoo")) == 1
    fine = """
from obcjax import kernels as K
from obcjax.kernels import solve, Result
from obcjax.kernels.exactobs import allocate_counts
from obcjax.transforms import _group_kernel
K.solve, K.Status.OK, K.__name__
x._private
getattr(K, "solve")
"""
    assert violations(fine) == []


@pytest.mark.parametrize("rel", list(_files()))
def test_no_private_kernel_names_outside_the_kernels(rel):
    found = violations((ROOT / rel).read_text(encoding="utf-8"), _package(rel))
    assert not found, (
        f"{rel} uses private names of obcjax.kernels (export what it needs from "
        "obcjax/kernels/__init__.py under a public name instead):\n  " + "\n  ".join(found)
    )
