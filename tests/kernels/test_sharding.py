"""Row sharding: ``mesh=`` splits the rows over a device mesh and must not change any result.

Rows are independent in every ExactOBS / OBQ greedy (the layer loss decouples over rows), so the
solvers run them under ``shard_map`` over the first mesh axis, padding the row count up to a
multiple of the device count. ``tests/conftest.py`` provides 4 fake CPU devices. Masks and codes
must be identical; floats may differ only by the round-off of a different chunking of the rows.

Example:
    .venv/bin/pytest tests/kernels/test_sharding.py
"""

from __future__ import annotations

import importlib

import jax
import numpy as np
import pytest

from obcjax.kernels import exactobs_nm, exactobs_prune, obq_prune_quantize, obq_quantize
from obcjax.specs import NM, Int
from tests.kernels.reference import make_problem

exactobs = importlib.import_module("obcjax.kernels.exactobs")

COLS, DEAD = 32, (5,)
ASYM4 = Int(bits=4, sym=False)

SOLVERS = {
    "prune": lambda W, H, mesh: exactobs_prune(W, H, 0.5, method="naive", mesh=mesh),
    "prune-levels": lambda W, H, mesh: exactobs_prune(
        W, H, [0.25, 0.5, 0.9], method="naive", mesh=mesh
    ),
    # one level with the fast kernel: an early-stopped pass, then a re-run of a padded row subset
    "prune-fast": lambda W, H, mesh: exactobs_prune(W, H, 0.5, method="fast", mesh=mesh),
    "prune-blocked": lambda W, H, mesh: exactobs_prune(W, H, 0.5, method="blocked", mesh=mesh),
    "nm": lambda W, H, mesh: exactobs_nm(W, H, 2, 4, method="naive", mesh=mesh),
    "obq": lambda W, H, mesh: obq_quantize(W, H, ASYM4, method="naive", mesh=mesh),
    "prune-quantize": lambda W, H, mesh: obq_prune_quantize(
        W, H, NM(2, 4), ASYM4, method="naive", mesh=mesh
    ),
}


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) == 4, "tests/conftest.py should provide 4 fake CPU devices"
    return jax.make_mesh((4,), ("rows",), axis_types=(jax.sharding.AxisType.Auto,))


def _problem(rows):
    W, H = make_problem(rows, COLS, 0, dead=DEAD)
    W[rows // 3] *= 1e-3  # pruned entirely at 50%: the fast single-level path re-runs this row
    return W, H


def _assert_same(a, b):
    for field in ("mask", "qarray"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
    if a.mask is not None:
        np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
    if a.qarray is not None:
        for x, y in zip(jax.tree.leaves(a.qarray), jax.tree.leaves(b.qarray)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for field in ("weights", "loss", "row_loss"):
        x, y = np.asarray(getattr(a, field)), np.asarray(getattr(b, field))
        assert x.shape == y.shape and x.dtype == y.dtype, field
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14, err_msg=field)


@pytest.mark.parametrize(
    "name, rows",
    [(name, 6) for name in SOLVERS] + [("prune", 8)],
)
def test_mesh_gives_the_single_device_result(name, rows, mesh, monkeypatch):
    """6 rows are padded to 8 (2 per device); 8 rows split evenly."""
    W, H = _problem(rows)
    single = SOLVERS[name](W, H, None)
    meshes = []
    greedy = exactobs._greedy_jit

    def spy(*args):
        meshes.append(args[-2])
        return greedy(*args)

    monkeypatch.setattr(exactobs, "_greedy_jit", spy)
    sharded = SOLVERS[name](W, H, mesh)
    assert meshes and all(m is mesh for m in meshes)  # every greedy pass ran on the mesh
    _assert_same(sharded, single)
    assert np.asarray(sharded.weights).shape[-2] == rows


def test_mesh_with_fewer_rows_than_padding(mesh):
    # obq_prune_quantize shares the padding code (its "pre" attribute) and fails the same way
    W, H = _problem(6)
    sharded = SOLVERS["obq"](W[:1], H, mesh)  # raises today
    _assert_same(sharded, SOLVERS["obq"](W[:1], H, None))
