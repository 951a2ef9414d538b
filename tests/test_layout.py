"""obcjax.layout: kernel <-> (groups, rows, cols) matrices for Dense, Conv (grouped, depthwise)
and DenseGeneral (attention projections), against a direct NumPy construction."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from obcjax.layout import Layout, from_matrices, get_path, layout_for, set_path, to_matrices

CASES = [
    # shape, cols, groups, n_in
    ((16, 8), 16, 1, 1),  # Dense
    ((3, 3, 4, 8), 36, 1, 3),  # Conv HWIO
    ((3, 3, 2, 8), 18, 2, 3),  # grouped conv, 2 groups
    ((3, 3, 1, 6), 9, 6, 3),  # depthwise
    ((32, 4, 8), 32, 1, 1),  # attention query/key/value (in, heads, head_dim)
    ((4, 8, 32), 32, 1, 2),  # attention output (heads, head_dim, out)
    ((5, 1, 7), 5, 1, 2),  # a size-1 axis counts as an input
]


def _reference(k, cols, groups):
    """Group g's matrix: rows = output units g*R..(g+1)*R in flattened output order, columns =
    flattened contracted axes (row-major), built element by element."""
    k = np.asarray(k)
    out = k.size // cols
    flat = k.reshape(cols, out)
    R = out // groups
    W = np.zeros((groups, R, cols), k.dtype)
    for g in range(groups):
        for r in range(R):
            for c in range(cols):
                W[g, r, c] = flat[c, g * R + r]
    return W


@pytest.mark.parametrize("shape,cols,groups,n_in", CASES)
def test_round_trip_and_reference(shape, cols, groups, n_in):
    k = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    lay = layout_for(shape, cols, groups)
    assert lay == Layout(shape, n_in, groups)
    assert (lay.groups, lay.rows, lay.cols) == (groups, k.size // cols // groups, cols)
    W = to_matrices(k, lay)
    assert isinstance(W, np.ndarray)
    np.testing.assert_array_equal(W, _reference(k, cols, groups))
    np.testing.assert_array_equal(from_matrices(W, lay), k)
    Wj = to_matrices(jnp.asarray(k), lay)
    assert isinstance(Wj, jax.Array)
    np.testing.assert_array_equal(np.asarray(from_matrices(Wj, lay)), k)
    # traceable: the layout is static
    back = jax.jit(lambda x: from_matrices(to_matrices(x, lay) * 2, lay))(jnp.asarray(k))
    np.testing.assert_array_equal(np.asarray(back), 2 * k)


def test_dense_matrix_is_kernel_transpose():
    k = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(to_matrices(k, layout_for(k.shape, 3))[0], k.T)


def test_matches_flax_attention_projection():
    """The matrix of a DenseGeneral kernel computes the layer: y = x @ Wᵀ, reshaped."""
    layer = nn.DenseGeneral(features=(4, 8), axis=-1, use_bias=False)
    x = jax.random.normal(jax.random.key(0), (5, 32))
    v = layer.init(jax.random.key(1), x)
    k = v["params"]["kernel"]
    W = to_matrices(k, layout_for(k.shape, 32))[0]
    y = layer.apply(v, x).reshape(5, -1)
    np.testing.assert_allclose(np.asarray(x @ W.T), np.asarray(y), rtol=1e-5, atol=1e-5)
    out = nn.DenseGeneral(features=32, axis=(-2, -1), use_bias=False)
    h = jax.random.normal(jax.random.key(2), (5, 4, 8))
    vo = out.init(jax.random.key(3), h)
    ko = vo["params"]["kernel"]
    Wo = to_matrices(ko, layout_for(ko.shape, 32))[0]
    np.testing.assert_allclose(np.asarray(h.reshape(5, 32) @ Wo.T), np.asarray(out.apply(vo, h)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape,cols,groups,match",
    [
        ((16, 8), 10, 1, "no leading axes of the kernel multiply to 10"),
        ((3, 3, 4, 9), 36, 2, "do not split into 2 groups"),
        ((8,), 8, 1, "needs input and output axes"),
    ],
)
def test_bad_layouts_name_the_layer(shape, cols, groups, match):
    with pytest.raises(ValueError, match=match) as e:
        layout_for(shape, cols, groups, layer="enc/q")
    assert "'enc/q'" in str(e.value)


def test_mismatched_arrays_are_errors():
    lay = layout_for((4, 6), 4)
    with pytest.raises(ValueError, match="does not match"):
        to_matrices(np.zeros((6, 4)), lay)
    with pytest.raises(ValueError, match="do not match"):
        from_matrices(np.zeros((1, 4, 6)), lay)


def test_paths_are_functional():
    tree = {"a": {"b": {"kernel": 1, "bias": 0}}, "c": {}}
    new = set_path(tree, "a/b", "kernel", 2)
    assert tree["a"]["b"]["kernel"] == 1  # input not mutated
    assert get_path(new, "a/b", "kernel") == 2 and new["c"] is tree["c"]
    with pytest.raises(KeyError, match="no 'x' under 'a'"):
        get_path(tree, "a/x", "kernel")


def test_nnx_list_integer_keys_compress_end_to_end():
    """An ``nnx.List`` of layers: its pure dict has integer keys, paths spell them as digits."""
    from flax import nnx

    from obcjax.calibration import calibrate
    from obcjax.layout import get_path, set_path
    from obcjax.specs import Unstructured
    from obcjax.transforms import compress

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(3)])
            self.head = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            for layer in self.layers:
                x = nnx.relu(layer(x))
            return self.head(x)

    model = Net(nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert 1 in params["layers"]  # integer keys
    np.testing.assert_array_equal(get_path(params, "layers/1", "kernel"),
                                  params["layers"][1]["kernel"])
    assert list(set_path(params, "layers/1", "kernel", 0)["layers"]) == [0, 1, 2]
    stats = calibrate(model, None, [x])
    assert list(stats) == ["layers/0", "layers/1", "layers/2", "head"]
    out = compress(params, stats, [("head", None), (".*", Unstructured(0.5))])
    assert jax.tree.structure(out.params) == jax.tree.structure(params)
    assert float(np.mean(np.asarray(out.params["layers"][1]["kernel"]) == 0)) == 0.5
    assert out.mask("layers/1") is not None and out.mask("head") is None
    nnx.update(model, out.params)
    assert model(x).shape == (64, 2)
