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


# ----------------------------------------------------------------------------------------------
# No module uses another module's private name (the whole package and the experiments)
# ----------------------------------------------------------------------------------------------
#
# A name with a leading underscore belongs to its module. The unit that may share private names
# is the module itself, or, for the subpackages obcjax.kernels, obcjax.zoo and obcjax.recipes,
# the subpackage (their modules are written together: ``kernels/_engine.py`` is the kernels'
# shared engine). The package's own private helper modules (``obcjax._checks``,
# ``obcjax._extras``) have public names and serve every module of obcjax/. Tests are exempt (they
# are white-box tests of a module's internals), except for the kernels' private names, checked
# above; so is ``benchmarks/``, which times the kernels' internal phases on purpose.

PRIVATE_CHECKED = ("obcjax", "experiments")
UNITS = ("obcjax.kernels", "obcjax.zoo", "obcjax.recipes")


def _module_of(rel: str) -> str:
    return rel[: -len(".py")].replace("/", ".").removesuffix(".__init__")


def _unit(module: str) -> str:
    return next((u for u in UNITS if module == u or module.startswith(u + ".")), module)


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def private_uses(source: str, module: str) -> list[str]:
    """Private names of other obcjax modules that ``source`` (the module ``module``) uses."""
    tree = ast.parse(source)
    package = module if _is_module(module + ".__init__") else module.rpartition(".")[0]
    inside = module == "obcjax" or module.startswith("obcjax.")
    found: list[str] = []
    aliases: dict[str, str] = {}  # local name -> the obcjax module it is bound to

    def foreign(target: str) -> bool:
        return _unit(target) != _unit(module)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("obcjax"):
                    aliases[a.asname or a.name] = a.name
                    if a.asname is None:
                        aliases["obcjax"] = "obcjax"
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node.module, node.level, package)
            if not target or not (target == "obcjax" or target.startswith("obcjax.")):
                continue
            parts = target.split(".")
            if any(_private(p) for p in parts[2:]) and foreign(target):
                found.append(f"line {node.lineno}: from {target} import ... (a private module "
                             f"of {_unit(target)})")
                continue
            if len(parts) == 2 and _private(parts[1]) and not inside:
                found.append(f"line {node.lineno}: from {target} import ... (private to obcjax)")
                continue
            for a in node.names:
                if _private(a.name) and foreign(target):
                    found.append(f"line {node.lineno}: from {target} import {a.name}")
                elif _is_module(f"{target}.{a.name}"):
                    aliases[a.asname or a.name] = f"{target}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = ast.unparse(node.value)
            target = aliases.get(base)
            if target is None and base.startswith("obcjax.") and "obcjax" in aliases:
                target = base if _is_module(base) else None
            if target is not None and foreign(target) and not _is_module(f"{target}.{node.attr}"):
                found.append(f"line {node.lineno}: {base}.{node.attr}")
            elif target is not None and _is_module(f"{target}.{node.attr}") and foreign(
                f"{target}.{node.attr}"
            ):
                found.append(f"line {node.lineno}: {base}.{node.attr} (a private module)")
    return found


def test_private_checker_flags_every_form():
    bad = [
        "from obcjax.transforms import _solve",
        "from obcjax.allocation import parse_level, _as_level",
        "from obcjax import allocation as A",
        "A._as_level(1)",
        "import obcjax.export as E",
        "E._MANIFEST_KEY",
        "from obcjax.kernels._engine import phase_plan",
        "import obcjax",
        "obcjax.transforms._solve",
    ]
    flagged = {int(v.split(":")[0].split()[1]) for v in private_uses("\n".join(bad), "obcjax.fit")}
    assert flagged == {1, 2, 4, 6, 7, 9}, flagged
    fine = """
from obcjax._checks import check_rules
from obcjax.transforms import Compressed, compress
from obcjax import kernels as K
out._replace(params=None)
Compressed._fields
K.solve
self._cache
"""
    assert private_uses(fine, "obcjax.fit") == []
    # within a subpackage unit, private names are shared; a module's own are always fine
    assert private_uses("from obcjax.kernels.prepare import _real_array", "obcjax.kernels.gptq") == []
    assert private_uses("from obcjax.zoo import models\nmodels._plain", "obcjax.zoo.train") == []
    assert private_uses("from .prepare import _real_array", "obcjax.kernels.gptq") == []
    assert len(private_uses("from obcjax.zoo.models import _plain", "obcjax.recipes.admm")) == 1
    assert len(private_uses("from obcjax._checks import check_rules", "experiments.opq")) == 1


def _private_files():
    for top in PRIVATE_CHECKED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if "/." not in rel:
                yield rel


@pytest.mark.parametrize("rel", list(_private_files()))
def test_no_private_names_of_other_modules(rel):
    found = private_uses((ROOT / rel).read_text(encoding="utf-8"), _module_of(rel))
    assert not found, (
        f"{rel} uses private names of other modules (give the name a public home in its "
        "module's __all__ instead):\n  " + "\n  ".join(found)
    )


# ----------------------------------------------------------------------------------------------
# The import contracts of pyproject.toml ([tool.importlinter]), run with import-linter
# ----------------------------------------------------------------------------------------------


def _lint_imports() -> list[str]:
    import shutil
    import sys

    exe = Path(sys.executable).parent / "lint-imports"
    found = str(exe) if exe.exists() else shutil.which("lint-imports")
    assert found, "lint-imports not found: pip install import-linter (in obcjax's dev extra)"
    return [found, str(ROOT / "pyproject.toml"), "--no-cache"]


def test_import_contracts_hold():
    import subprocess

    proc = subprocess.run(_lint_imports(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout, proc.stdout[-2000:]


def test_import_contracts_catch_violations(tmp_path):
    # The same contracts on a stand-in package named obcjax whose modules break each of them:
    # kernels importing Flax, a library module importing the zoo, the zoo importing the library.
    import os
    import re
    import subprocess
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    names = {"obcjax.transforms", "obcjax.kernels.solve", "obcjax.zoo.train", "obcjax._extras",
             "obcjax.fileio", "obcjax.cli"}
    for contract in config["contracts"]:
        for key in ("source_modules", "forbidden_modules", "protected_modules",
                    "allowed_importers"):
            names |= {m for m in contract.get(key, ()) if m.startswith("obcjax") and "*" not in m}
    body = {
        "obcjax.kernels.solve": "import flax\n",
        "obcjax.transforms": "from obcjax.zoo import train\n",
        "obcjax.zoo.train": "from obcjax import _extras, fileio, transforms\n",
        "obcjax.cli": "from obcjax.zoo import train\nfrom obcjax.recipes import x\n",
    }
    names.add("obcjax.recipes.x")
    for name in sorted(names):
        parts = name.split(".")
        for i in range(1, len(parts)):
            pkg = tmp_path.joinpath(*parts[:i])
            pkg.mkdir(exist_ok=True)
            (pkg / "__init__.py").touch()
        target = tmp_path.joinpath(*parts)
        if target.is_dir():
            target = target / "__init__.py"
        else:
            target = target.with_suffix(".py")
        target.write_text(body.get(name, ""))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(_lint_imports(), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert re.search(r"Contracts: 0 kept, 3 broken", proc.stdout), proc.stdout[-3000:]
    assert "obcjax.kernels.solve -> flax" in proc.stdout
    assert "obcjax.transforms -> obcjax.zoo.train" in proc.stdout
    assert "obcjax.zoo.train -> obcjax.transforms" in proc.stdout
