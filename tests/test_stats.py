"""obcjax.stats: Hessian accumulation against float64 NumPy, im2col against lax convolutions."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from obcjax.stats import (
    HessianState,
    conv_patches,
    dense_inputs,
    hessian_finalize,
    hessian_init,
    hessian_update,
)
from tests.reference_stats import np_patches

RNG = np.random.default_rng(0)


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(np.abs(b).max(), 1e-30)
    assert np.abs(a - b).max() <= rtol * scale, np.abs(a - b).max() / scale


# ----------------------------------------------------------------------------- accumulator


def test_init_shapes():
    s = hessian_init(5, groups=3)
    assert isinstance(s, HessianState)
    assert s.sum.shape == (3, 5, 5) and s.sum.dtype == jnp.float32
    assert s.count.shape == () and s.count.dtype == jnp.int32 and int(s.count) == 0
    with pytest.raises(ValueError, match="cols and groups"):
        hessian_init(0)


def test_update_and_finalize_match_float64_numpy():
    xs = [RNG.normal(size=(n, 7)).astype(np.float32) for n in (5, 11, 3)]
    s = hessian_init(7)
    for x in xs:
        s = hessian_update(s, x)
    X = np.concatenate(xs).astype(np.float64)
    assert int(s.count) == 19
    _close(s.sum[0], X.T @ X)
    _close(hessian_finalize(s)[0], 2 * X.T @ X / 19)


def test_update_grouped_and_mask():
    x = RNG.normal(size=(9, 3, 4)).astype(np.float32)
    mask = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0], bool)
    s = hessian_update(hessian_init(4, 3), x, mask=mask)
    assert int(s.count) == mask.sum()
    for g in range(3):
        xg = x[mask, g].astype(np.float64)
        _close(s.sum[g], xg.T @ xg)
    with pytest.raises(ValueError, match=r"expected \(tokens, 3, 4\)"):
        hessian_update(hessian_init(4, 3), x[:, :2])
    with pytest.raises(ValueError, match="mask"):
        hessian_update(hessian_init(4, 3), x, mask=mask[:4])


def test_update_does_not_mutate_and_jits():
    s0 = hessian_init(3)
    x = jnp.ones((4, 3))
    s1 = jax.jit(hessian_update)(s0, x)
    assert float(s0.sum.sum()) == 0 and int(s0.count) == 0
    assert float(s1.sum[0, 0, 0]) == 4 and int(s1.count) == 4


def test_update_uses_full_float32_precision():
    # Values that TF32 / bf16 passes would round: the product must keep ~7 digits.
    x = (1 + np.arange(64, dtype=np.float32)[:, None] * 1e-4) * np.ones((64, 2), np.float32)
    s = hessian_update(hessian_init(2), x)
    _close(s.sum[0], x.astype(np.float64).T @ x.astype(np.float64), rtol=1e-6)


def test_finalize_errors():
    with pytest.raises(ValueError, match="'fc'.*no token"):
        hessian_finalize(hessian_init(3), layer="fc")
    bad = hessian_update(hessian_init(2), np.array([[np.nan, 1.0]], np.float32))
    with pytest.raises(ValueError, match="NaN or inf"):
        hessian_finalize(bad)
    # Inside jit there is nothing to check concretely: no error, plain arithmetic.
    H = jax.jit(hessian_finalize)(hessian_update(hessian_init(2), jnp.ones((2, 2))))
    np.testing.assert_allclose(H[0], 2 * np.ones((2, 2)))


def test_dense_inputs_flattens_leading_dims():
    x = RNG.normal(size=(2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(dense_inputs(x), x.reshape(24, 5))


# ----------------------------------------------------------------------------- im2col


def _lax_conv(x, k, strides, padding, dilation, groups, input_dilation=None):
    nd = k.ndim - 2
    sp = "DHW"[-nd:] if nd <= 3 else None
    dn = ("N" + sp + "C", sp + "IO", "N" + sp + "C")
    return lax.conv_general_dilated(
        x,
        k,
        strides,
        padding,
        lhs_dilation=input_dilation,
        rhs_dilation=dilation,
        dimension_numbers=dn,
        feature_group_count=groups,
        precision=lax.Precision.HIGHEST,
    )


def _as_conv(p, k, groups):
    og = k.shape[-1] // groups
    return jnp.concatenate(
        [
            jnp.matmul(p[:, g], k[..., g * og : (g + 1) * og].reshape(-1, og), precision="highest")
            for g in range(groups)
        ],
        axis=-1,
    )


CASES = [
    # (x spatial, kernel spatial, cin, out, kwargs)
    ((9, 9), (3, 3), 4, 6, dict(strides=2, padding="SAME")),
    ((10, 9), (3, 3), 4, 6, dict(strides=2, padding="SAME")),
    ((9, 8), (3, 2), 4, 6, dict(padding=((1, 2), (0, 1)))),
    ((9, 8), (3, 3), 4, 6, dict(padding="VALID", dilation=2)),
    ((9, 8), (3, 3), 4, 6, dict(padding="SAME", dilation=(2, 1), strides=(1, 2))),
    ((8, 8), (3, 3), 6, 6, dict(feature_group_count=6)),  # depthwise
    ((8, 8), (3, 3), 6, 12, dict(feature_group_count=6, strides=2)),  # depthwise x2
    ((8, 7), (3, 3), 6, 4, dict(feature_group_count=2, padding=1)),  # grouped
    ((13,), (3,), 4, 5, dict(padding="SAME")),  # 1-d
    ((13,), (4,), 4, 6, dict(padding=[(2, 1)], strides=3, dilation=2, feature_group_count=2)),
    ((5, 6, 5), (2, 3, 2), 3, 4, dict(padding="SAME", strides=(1, 2, 1))),  # 3-d
    ((7, 7), (3, 3), 4, 6, dict(padding=((1, 1), (2, 2)), input_dilation=2, strides=2)),
]


@pytest.mark.parametrize("xs, ks, cin, out, kw", CASES)
def test_conv_patches_reproduce_the_convolution(xs, ks, cin, out, kw):
    x = RNG.normal(size=(2, *xs, cin)).astype(np.float32)
    G = kw.get("feature_group_count", 1)
    k = RNG.normal(size=(*ks, cin // G, out)).astype(np.float32)
    p = conv_patches(x, k.shape, **kw)
    nd = len(xs)
    pad = kw.get("padding", "SAME")
    pad = [(pad, pad)] * nd if isinstance(pad, int) else pad
    y = _lax_conv(
        x,
        k,
        (kw.get("strides", 1),) * nd if isinstance(kw.get("strides", 1), int) else kw["strides"],
        pad,
        (kw.get("dilation", 1),) * nd if isinstance(kw.get("dilation", 1), int) else kw["dilation"],
        G,
        (kw.get("input_dilation", 1),) * nd,
    )
    assert p.shape == (y.size // out, G, int(np.prod(ks)) * cin // G)
    _close(_as_conv(p, k, G), y.reshape(-1, out), rtol=1e-5)


def test_conv_patches_equal_loop_reference_exactly():
    x = RNG.normal(size=(2, 7, 6, 4)).astype(np.float32)
    p = conv_patches(x, (3, 2, 2, 5), strides=(2, 1), padding=((1, 0), (2, 1)), dilation=(1, 2),
                     feature_group_count=2)
    ref = np_patches(x, (3, 2), (2, 1), [(1, 0), (2, 1)], (1, 2), 2)
    np.testing.assert_array_equal(np.asarray(p, np.float64), ref)


def test_lax_patches_are_channel_major_ours_are_not():
    # The trap of obc.md §8: lax orders features (cin, kh, kw); a permutation of it gives ours.
    x = RNG.normal(size=(1, 6, 6, 3)).astype(np.float32)
    ours = conv_patches(x, (2, 2, 3, 1), padding="VALID")[:, 0]
    theirs = lax.conv_general_dilated_patches(
        x, (2, 2), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    ).reshape(-1, 3, 4)
    assert not np.allclose(ours, theirs.reshape(-1, 12))
    np.testing.assert_allclose(ours, theirs.transpose(0, 2, 1).reshape(-1, 12), rtol=1e-6)


@pytest.mark.parametrize("padding", ["CIRCULAR", "REFLECT", "CAUSAL"])
def test_conv_patches_flax_paddings(padding):
    from flax import linen as nn

    nd = 1 if padding == "CAUSAL" else 2
    xs = (2, 9) if nd == 1 else (2, 7, 6)
    ks = (3,) if nd == 1 else (3, 2)
    x = RNG.normal(size=(*xs, 4)).astype(np.float32)
    conv = nn.Conv(6, ks, padding=padding, kernel_dilation=2, use_bias=False,
                   precision=lax.Precision.HIGHEST)
    v = conv.init(jax.random.key(0), x)
    k = v["params"]["kernel"]
    p = conv_patches(x, k.shape, padding=padding, dilation=2)
    _close(_as_conv(p, k, 1), conv.apply(v, x).reshape(-1, 6))


def test_conv_patches_batch_dims_like_flax():
    x = RNG.normal(size=(3, 2, 5, 5, 2)).astype(np.float32)
    p = conv_patches(x, (3, 3, 2, 1))
    np.testing.assert_array_equal(p, conv_patches(x.reshape(6, 5, 5, 2), (3, 3, 2, 1)))
    np.testing.assert_array_equal(conv_patches(x[0, 0], (3, 3, 2, 1)),
                                  conv_patches(x[0, :1], (3, 3, 2, 1)))


def test_conv_patches_negative_padding_crops():
    # XLA's CPU convolution returns garbage for negative padding with several channels (seen on
    # jaxlib 0.10.2), so compare with an explicit crop instead.
    x = RNG.normal(size=(2, 6, 5, 3)).astype(np.float32)
    p = conv_patches(x, (3, 3, 3, 1), padding=((-1, 1), (0, 0)))
    q = conv_patches(x[:, 1:], (3, 3, 3, 1), padding=((0, 1), (0, 0)))
    np.testing.assert_array_equal(p, q)


def test_conv_patches_errors():
    x = jnp.ones((2, 5, 5, 4))
    with pytest.raises(ValueError, match="in/G = 3"):
        conv_patches(x, (3, 3, 3, 8))
    with pytest.raises(ValueError, match="2 group"):
        conv_patches(x, (3, 3, 4, 8), feature_group_count=2)
    with pytest.raises(ValueError, match="too few dims"):
        conv_patches(jnp.ones((5, 4)), (3, 3, 4, 8))
    with pytest.raises(ValueError, match="unknown padding"):
        conv_patches(x, (3, 3, 4, 8), padding="FULL")
    with pytest.raises(ValueError, match="input_dilation"):
        conv_patches(x, (3, 3, 4, 8), padding="SAME", input_dilation=2)
    with pytest.raises(ValueError, match="CAUSAL"):
        conv_patches(x, (3, 3, 4, 8), padding="CAUSAL")
    with pytest.raises(ValueError, match="strides"):
        conv_patches(x, (3, 3, 4, 8), strides=(1, 2, 3))
    with pytest.raises(ValueError, match="padding"):
        conv_patches(x, (3, 3, 4, 8), padding=[(1, 1)])


def test_save_and_load_stats_round_trip_recipe_and_corruption(tmp_path):
    from obcjax.fileio import CorruptedFileError
    from obcjax.stats import load_stats, save_stats

    rng = np.random.default_rng(0)
    st = {"conv": hessian_update(hessian_init(6, 2), rng.normal(size=(10, 2, 6)).astype(np.float32)),
          "fc": hessian_update(hessian_init(4), rng.normal(size=(7, 4)).astype(np.float32))}
    f = tmp_path / "s.npz"
    assert load_stats(f) is None  # nothing saved yet
    save_stats(f, st, recipe={"n": 10, "layers": ["conv", "fc"]})
    back = load_stats(f, recipe={"n": 10, "layers": ["conv", "fc"]})
    assert list(back) == ["conv", "fc"]  # order kept
    for k in st:
        np.testing.assert_array_equal(back[k].sum, np.asarray(st[k].sum))
        assert int(back[k].count) == int(st[k].count)
    assert load_stats(f, recipe={"n": 11, "layers": ["conv", "fc"]}) is None
    # one flipped byte in the data, a truncated file, a file of another kind: errors, never stats
    raw = f.read_bytes()
    i = raw.index(np.asarray(st["fc"].sum).tobytes()[:8])
    flipped = tmp_path / "flipped.npz"
    flipped.write_bytes(raw[:i] + bytes([raw[i] ^ 1]) + raw[i + 1:])
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(raw[: len(raw) // 2])
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    for bad in (flipped, truncated, other):
        with pytest.raises(CorruptedFileError, match=bad.name):
            load_stats(bad, recipe={"n": 10, "layers": ["conv", "fc"]})
    with pytest.raises(ValueError, match="HessianState"):
        save_stats(tmp_path / "x.npz", {"fc": np.eye(3)})
    with pytest.raises(ValueError, match="JSON"):
        save_stats(tmp_path / "x.npz", st, recipe={"f": object()})
