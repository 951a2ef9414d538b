"""Tests of obcjax.export: bit packing, packed layers, the file format and its refusals."""

from __future__ import annotations

import json
import math
import os

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as stn
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from obcjax import export as E
from obcjax.quant import QArray
from obcjax.specs import NM, Int

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)
NM_PATTERNS = [(2, 4), (1, 4), (4, 8)]


# ----------------------------------------------------------------------------------------------
# helpers (independent of the module under test)
# ----------------------------------------------------------------------------------------------


def _ref_pack(codes, bits):
    """Pure-Python LSB-first bit stream: one big integer, little-endian bytes."""
    acc = 0
    for i, c in enumerate(int(x) for x in np.asarray(codes).reshape(-1)):
        acc |= c << (i * bits)
    n = (np.size(codes) * bits + 7) // 8
    return np.frombuffer(acc.to_bytes(n, "little"), np.uint8) if n else np.zeros(0, np.uint8)


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _make_qarray(rng, rows, cols, bits, granularity, group_size=None):
    maxq = (1 << bits) - 1
    gs = {"channel": cols, "tensor": cols, "group": group_size}[granularity]
    ng = cols // gs
    scale = (rng.random((rows, ng)) + 0.05).astype(np.float32)
    zero = rng.integers(0, maxq + 1, (rows, ng)).astype(np.float32)
    if granularity == "tensor":
        scale = np.broadcast_to(scale[:1, :1], (rows, ng)).copy()
        zero = np.broadcast_to(zero[:1, :1], (rows, ng)).copy()
    codes = rng.integers(0, maxq + 1, (rows, cols)).astype(np.uint8)
    return QArray(codes, scale, zero, bits, gs)


def _zero_codes(q, mask):
    """The QArray with the pruned codes at the zero point (where the solvers put them)."""
    ze = np.repeat(np.asarray(q.zero), q.group_size, axis=1).astype(np.uint8)
    return q._replace(codes=np.where(mask, q.codes, ze).astype(np.uint8))


def _deq(q):
    se = np.repeat(q.scale, q.group_size, axis=1)
    ze = np.repeat(q.zero, q.group_size, axis=1)
    return (se * (q.codes.astype(np.float32) - ze)).astype(np.float32)


def _nm_mask(rng, rows, cols, n, m):
    keys = rng.random((rows, cols // m, m))
    ranks = np.argsort(np.argsort(keys, axis=-1), axis=-1)
    return (ranks < m - n).reshape(rows, cols)


def _roundtrip_file(tmp_dir, layer, name="layer"):
    path = os.path.join(tmp_dir, "rt.safetensors")
    E.save(path, {name: layer}, metadata={"note": "rt"})
    layers, meta = E.load(path)
    assert meta == {"note": "rt"}
    assert list(layers) == [name]
    back = layers[name]
    assert back.spec == layer.spec
    assert set(back.tensors) == set(layer.tensors)
    for part in layer.tensors:
        assert _bits_equal(back.tensors[part], layer.tensors[part]), part
    return back


def _check_qarray(q_out, q_in):
    assert q_out.bits == q_in.bits and q_out.group_size == q_in.group_size
    for field in ("codes", "scale", "zero"):
        assert _bits_equal(getattr(q_out, field), np.asarray(getattr(q_in, field))), field


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("export"))


# ----------------------------------------------------------------------------------------------
# bit packing
# ----------------------------------------------------------------------------------------------


@SETTINGS
@given(st.integers(1, 8), st.integers(0, 70), st.integers(0, 2**32 - 1))
def test_pack_bits_matches_reference_and_roundtrips(bits, n, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, n).astype(np.uint8)
    packed = E.pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == ((n * bits + 7) // 8,)
    assert _bits_equal(packed, _ref_pack(codes, bits))
    assert _bits_equal(E.unpack_bits(packed, bits, n), codes)


def test_pack_bits_three_bit_layout_and_tail():
    codes = np.array([1, 2, 3, 4, 5, 6, 7, 0, 5, 3])
    packed = E.pack_bits(codes, 3)
    # 8 codes fill 3 bytes; the 2-code tail takes 6 bits of a fourth byte
    assert packed.size == 4
    assert _bits_equal(packed[:3], _ref_pack(codes[:8], 3))
    assert int(packed[3]) == 5 | (3 << 3)
    assert _bits_equal(E.unpack_bits(packed, 3, 10), codes.astype(np.uint8))


def test_pack_bits_large_chunked_stream(monkeypatch):
    monkeypatch.setattr(E, "_CHUNK_GROUPS", 3)  # force several chunks on a small input
    rng = np.random.default_rng(1)
    for bits in (2, 3, 5):
        codes = rng.integers(0, 1 << bits, 61).astype(np.uint8)
        packed = E.pack_bits(codes, bits)
        assert _bits_equal(packed, _ref_pack(codes, bits))
        assert _bits_equal(E.unpack_bits(packed, bits, 61), codes)


def test_pack_bits_refusals():
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        E.pack_bits(np.array([0, 8]), 3)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        E.pack_bits(np.array([-1, 2]), 2)
    with pytest.raises(TypeError, match="integer"):
        E.pack_bits(np.array([0.5]), 4)
    with pytest.raises(ValueError, match="bits"):
        E.pack_bits(np.array([1]), 9)
    with pytest.raises(ValueError, match="need 2 bytes"):
        E.unpack_bits(np.zeros(3, np.uint8), 3, 5)
    with pytest.raises(ValueError, match="padding"):
        E.unpack_bits(np.array([0, 0xFF], np.uint8), 3, 5)


# ----------------------------------------------------------------------------------------------
# per-layer round trips (every kind), through a file
# ----------------------------------------------------------------------------------------------


@st.composite
def _grid_case(draw, nm_cols=None):
    rows = draw(st.integers(1, 9))
    cols = nm_cols(draw) if nm_cols else draw(st.integers(1, 23))
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    gran = draw(st.sampled_from(["channel", "group", "tensor"]))
    divisors = [d for d in range(1, cols + 1) if cols % d == 0]
    gs = draw(st.sampled_from(divisors)) if gran == "group" else None
    return rows, cols, bits, gran, gs


@SETTINGS
@given(
    st.lists(st.integers(1, 9), min_size=1, max_size=3),
    st.sampled_from(["float32", "float16", None]),
    st.integers(0, 2**32 - 1),
)
def test_dense_roundtrip(tmp_dir, shape, dtype, seed):
    W = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    layer = E.pack_layer(W, dtype=dtype)
    assert layer.kind == "dense"
    want = W.astype(np.float16).astype(np.float32) if dtype == "float16" else W
    back = _roundtrip_file(tmp_dir, layer)
    w, m, q = E.unpack_layer(back)
    assert _bits_equal(w, want) and m is None and q is None


@SETTINGS
@given(_grid_case(), st.integers(0, 2**32 - 1))
def test_quantized_roundtrip(tmp_dir, case, seed):
    rows, cols, bits, gran, gs = case
    q = _make_qarray(np.random.default_rng(seed), rows, cols, bits, gran, gs)
    W = _deq(q)
    layer = E.pack_layer(W, qarray=q)
    assert layer.kind == "quantized"
    if gran == "tensor" and rows * (cols // q.group_size) > 1:
        # one shared codebook: a single scale and zero whatever the number of rows
        assert layer.granularity == "tensor" and layer.tensors["scale"].shape == (1, 1)
    w, m, q2 = E.unpack_layer(_roundtrip_file(tmp_dir, layer))
    assert _bits_equal(w, W) and m is None
    _check_qarray(q2, q)


@SETTINGS
@given(
    st.lists(st.integers(1, 9), min_size=1, max_size=3),
    st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]),
    st.sampled_from(["float32", "float16"]),
    st.integers(0, 2**32 - 1),
)
def test_sparse_roundtrip(tmp_dir, shape, sparsity, dtype, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) >= sparsity
    W = np.where(mask, rng.standard_normal(shape), 0).astype(np.float32)
    if mask.any():  # a kept weight that happens to be 0 must stay "kept"
        W[np.unravel_index(np.flatnonzero(mask)[0], shape)] = 0.0
    layer = E.pack_layer(W, mask=mask, dtype=dtype)
    assert layer.kind == "sparse" and layer.nnz == mask.sum()
    w, m, q = E.unpack_layer(_roundtrip_file(tmp_dir, layer))
    want = W.astype(np.float16).astype(np.float32) if dtype == "float16" else W
    assert _bits_equal(w, want) and _bits_equal(m, mask) and q is None


@SETTINGS
@given(_grid_case(), st.sampled_from([0.0, 0.5, 0.9, 1.0]), st.integers(0, 2**32 - 1))
def test_sparse_quantized_roundtrip(tmp_dir, case, sparsity, seed):
    rows, cols, bits, gran, gs = case
    rng = np.random.default_rng(seed)
    mask = rng.random((rows, cols)) >= sparsity
    q = _zero_codes(_make_qarray(rng, rows, cols, bits, gran, gs), mask)
    W = np.where(mask, _deq(q), 0).astype(np.float32)
    layer = E.pack_layer(W, mask=mask, qarray=q)
    assert layer.kind == "sparse_quantized"
    w, m, q2 = E.unpack_layer(_roundtrip_file(tmp_dir, layer))
    assert _bits_equal(w, W) and _bits_equal(m, mask)
    _check_qarray(q2, q)


def _nm_cols(pattern):
    return lambda draw: pattern[1] * draw(st.integers(1, 5))


@SETTINGS
@given(
    st.sampled_from(NM_PATTERNS),
    st.integers(1, 9),
    st.integers(1, 5),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_nm_roundtrip(tmp_dir, pattern, rows, ngroups, give_mask, seed):
    n, m = pattern
    cols = m * ngroups
    rng = np.random.default_rng(seed)
    mask = _nm_mask(rng, rows, cols, n, m)
    W = np.where(mask, rng.standard_normal((rows, cols)) + 3.0, 0).astype(np.float32)
    layer = E.pack_layer(W, mask=mask if give_mask else None, nm=NM(n, m))
    assert layer.kind == "nm" and layer.nm == (n, m)
    assert layer.tensors["values"].shape == (rows, cols * (m - n) // m)
    w, mk, q = E.unpack_layer(_roundtrip_file(tmp_dir, layer))
    assert _bits_equal(w, W) and _bits_equal(mk, mask) and q is None


def test_nm_without_mask_keeps_first_zeros_of_sparse_groups():
    W = np.array([[0.0, 5.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0]], np.float32)
    w, mask, _ = E.unpack_layer(E.pack_layer(W, nm=(2, 4)))
    assert _bits_equal(w, W)
    assert mask.tolist() == [[True, True, False, False, True, True, False, False]]


@SETTINGS
@given(st.data(), st.integers(0, 2**32 - 1))
def test_nm_quantized_roundtrip(tmp_dir, data, seed):
    n, m = data.draw(st.sampled_from(NM_PATTERNS))
    rows, cols, bits, gran, gs = data.draw(_grid_case(nm_cols=_nm_cols((n, m))))
    rng = np.random.default_rng(seed)
    mask = _nm_mask(rng, rows, cols, n, m)
    q = _zero_codes(_make_qarray(rng, rows, cols, bits, gran, gs), mask)
    W = np.where(mask, _deq(q), 0).astype(np.float32)
    layer = E.pack_layer(W, mask=mask, qarray=q, nm=(n, m))
    assert layer.kind == "nm_quantized"
    w, mk, q2 = E.unpack_layer(_roundtrip_file(tmp_dir, layer))
    assert _bits_equal(w, W) and _bits_equal(mk, mask)
    _check_qarray(q2, q)


def test_pruned_codes_come_back_as_zero_point():
    rng = np.random.default_rng(3)
    q = _make_qarray(rng, 4, 8, 4, "channel")
    mask = rng.random((4, 8)) < 0.5
    W = np.where(mask, _deq(q), 0).astype(np.float32)  # codes at pruned spots are arbitrary
    w, _, q2 = E.unpack_layer(E.pack_layer(W, mask=mask, qarray=q))
    ze = np.repeat(q.zero, 8, axis=1)
    assert np.array_equal(q2.codes[mask], q.codes[mask])
    assert np.array_equal(q2.codes[~mask], ze[~mask].astype(np.uint8))
    assert _bits_equal(w, W)


def test_unpack_matches_library_dequantize():
    import jax.numpy as jnp

    from obcjax.quant import dequantize

    rng = np.random.default_rng(4)
    for gran, gs in (("channel", None), ("group", 4), ("tensor", None)):
        q = _make_qarray(rng, 5, 12, 3, gran, gs)
        w, _, q2 = E.unpack_layer(E.pack_layer(None, qarray=q))
        want = np.asarray(dequantize(QArray(*map(jnp.asarray, q[:3]), q.bits, q.group_size)))
        assert _bits_equal(w, want)
        assert _bits_equal(np.asarray(dequantize(q2)), want)


def test_real_solver_results_roundtrip(tmp_dir):
    """Results of the kernels (Result.weights/mask/qarray) survive save/load bit for bit."""
    from obcjax import kernels as K

    rng = np.random.default_rng(5)
    W = rng.standard_normal((8, 16)).astype(np.float32)
    # the baselines return the same Result layout as ExactOBS/OBQ and compile in a fraction of
    # the time; a per-tensor grid is the shared-codebook case
    rp = K.magnitude_nm(W, 2, 4)
    rq = K.rtn_quantize(rp.weights, Int(4, granularity="group", group_size=8))
    cases = {
        "rtn_tensor": (K.rtn_quantize(W, Int(2, granularity="tensor")), None, "quantized"),
        "magnitude_50": (K.magnitude_prune(W, 0.5), None, "sparse"),
        "nm_rtn": (rp._replace(qarray=rq.qarray, weights=rq.weights), (2, 4), "nm_quantized"),
    }
    packed = {
        k: E.pack_layer(r.weights, mask=r.mask, qarray=r.qarray, nm=nm)
        for k, (r, nm, _) in cases.items()
    }
    path = os.path.join(tmp_dir, "solvers.safetensors")
    E.save(path, packed)
    layers, _ = E.load(path)
    for k, (r, _, kind) in cases.items():
        assert layers[k].kind == kind
        w, m, q = E.unpack_layer(layers[k])
        assert _bits_equal(w, np.asarray(r.weights, np.float32))
        if r.mask is not None:
            assert _bits_equal(m, np.asarray(r.mask))
        if r.qarray is not None:
            _check_qarray(q, r.qarray)
    assert layers["rtn_tensor"].granularity == "tensor"


# ----------------------------------------------------------------------------------------------
# sizes on disk
# ----------------------------------------------------------------------------------------------


def test_file_size_close_to_theoretical(tmp_dir):
    R = C = 1024
    N = R * C
    rng = np.random.default_rng(6)
    dense = rng.standard_normal((R, C)).astype(np.float32)
    m50 = rng.random((R, C)) < 0.5
    m10 = rng.random((R, C)) < 0.1
    nm24 = _nm_mask(rng, R, C, 2, 4)
    nm14 = _nm_mask(rng, R, C, 1, 4)
    nm48 = _nm_mask(rng, R, C, 4, 8)
    q4 = _make_qarray(rng, R, C, 4, "channel")
    q3g = _make_qarray(rng, R, C, 3, "group", 128)
    q2t = _make_qarray(rng, R, C, 2, "tensor")
    q8 = _make_qarray(rng, R, C, 8, "channel")
    grid = 32 + 8  # float32 scale + uint8 zero point per row / group
    k50 = int(m50.sum())
    k10 = int(m10.sum())

    def sq(q, mask):
        q = _zero_codes(q, mask)
        return np.where(mask, _deq(q), 0).astype(np.float32), q

    cases = [  # name, pack kwargs, expected theoretical bits (independent formula)
        ("dense fp32", dict(weights=dense), 32 * N),
        ("dense fp16", dict(weights=dense, dtype="float16"), 16 * N),
        ("w4 per-channel", dict(weights=_deq(q4), qarray=q4), 4 * N + R * grid),
        ("w3 group 128", dict(weights=_deq(q3g), qarray=q3g), 3 * N + R * 8 * grid),
        ("w2 shared codebook", dict(weights=_deq(q2t), qarray=q2t), 2 * N + grid),
        ("w8 per-channel", dict(weights=_deq(q8), qarray=q8), 8 * N + R * grid),
        ("50% sparse fp32", dict(weights=np.where(m50, dense, 0), mask=m50), N + 32 * k50),
        (
            "90% sparse fp16",
            dict(weights=np.where(m10, dense, 0), mask=m10, dtype="float16"),
            N + 16 * k10,
        ),
        (
            "50% sparse + w4",
            dict(zip(("weights", "qarray"), sq(q4, m50)), mask=m50),
            N + 4 * k50 + R * grid,
        ),
        (
            "2:4 fp32",
            dict(weights=np.where(nm24, dense, 0), mask=nm24, nm=(2, 4)),
            2 * (N // 2) + 32 * (N // 2),
        ),
        (
            "1:4 fp16",
            dict(weights=np.where(nm14, dense, 0), mask=nm14, nm=(1, 4), dtype="float16"),
            2 * (3 * N // 4) + 16 * (3 * N // 4),
        ),
        (
            "2:4 + w4",
            dict(zip(("weights", "qarray"), sq(q4, nm24)), mask=nm24, nm=(2, 4)),
            2 * (N // 2) + 4 * (N // 2) + R * grid,
        ),
        (
            "4:8 + w3 g128",
            dict(zip(("weights", "qarray"), sq(q3g, nm48)), mask=nm48, nm=(4, 8)),
            3 * (N // 2) + 3 * (N // 2) + R * 8 * grid,
        ),
    ]
    rows = []
    for name, kw, want_bits in cases:
        layer = E.pack_layer(kw.pop("weights"), **kw)
        assert E.theoretical_bits(layer) == want_bits, name
        path = os.path.join(tmp_dir, "size.safetensors")
        E.save(path, {"w": layer})
        size = os.path.getsize(path)
        theo = want_bits / 8
        assert theo <= size <= 1.05 * theo, (name, size, theo)
        assert E.nbytes(layer) <= size
        rows.append((name, layer.kind, theo, size, size / theo, 4 * N / size))
    print(
        f"\n{'layer 1024x1024':<20} {'kind':<17} {'theory B':>10} {'file B':>10} "
        f"{'file/th':>8} {'fp32/file':>9}"
    )
    for name, kind, theo, size, ratio, gain in rows:
        print(f"{name:<20} {kind:<17} {theo:>10.0f} {size:>10d} {ratio:>8.4f} {gain:>8.2f}x")


# ----------------------------------------------------------------------------------------------
# refusals
# ----------------------------------------------------------------------------------------------


def _small_file(tmp_dir, name="small.safetensors"):
    rng = np.random.default_rng(7)
    mask = _nm_mask(rng, 8, 16, 2, 4)
    q = _zero_codes(_make_qarray(rng, 8, 16, 4, "channel"), mask)
    W = np.where(mask, _deq(q), 0).astype(np.float32)
    layers = {
        "a": E.pack_layer(W, mask=mask, qarray=q, nm=(2, 4)),
        "b": E.pack_layer(rng.standard_normal((8, 16)).astype(np.float32), qarray=None),
        "c": E.pack_layer(_deq(q), qarray=q),
    }
    path = os.path.join(tmp_dir, name)
    E.save(path, layers)
    return path


def _rewrite(path, edit_manifest=None, edit_tensors=None):
    with safe_open(path, framework="np") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    manifest = json.loads(header[E._MANIFEST_KEY])
    if edit_manifest:
        edit_manifest(manifest)
    if edit_tensors:
        edit_tensors(tensors)
    header[E._MANIFEST_KEY] = json.dumps(manifest)
    stn.save_file(tensors, path, metadata=header)


def test_refuses_truncated_file(tmp_dir):
    path = _small_file(tmp_dir)
    data = open(path, "rb").read()
    hlen = int.from_bytes(data[:8], "little")
    for cut in (0, 5, 8 + hlen // 2, 8 + hlen + 10, len(data) - 1):
        with open(path, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(ValueError, match="truncated or corrupted"):
            E.load(path)


def test_refuses_corrupted_tensor_bytes(tmp_dir):
    path = _small_file(tmp_dir)
    data = bytearray(open(path, "rb").read())
    hlen = int.from_bytes(data[:8], "little")
    for offset in (8 + hlen, len(data) - 1, (8 + hlen + len(data)) // 2):
        bad = bytearray(data)
        bad[offset] ^= 0x10
        with open(path, "wb") as f:
            f.write(bad)
        with pytest.raises(ValueError, match="checksum mismatch|corrupted"):
            E.load(path)


def test_refuses_corrupted_header(tmp_dir):
    path = _small_file(tmp_dir)
    data = bytearray(open(path, "rb").read())
    i = data.index(b"format_version")
    data[i + 2] = ord("#")  # breaks the key: the head check fails
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(ValueError):
        E.load(path)
    data[i - 3] = ord("{")  # breaks the JSON of the header itself
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(ValueError):
        E.load(path)


def test_refuses_newer_format_version(tmp_dir, monkeypatch):
    path = os.path.join(tmp_dir, "newer.safetensors")
    with monkeypatch.context() as mp:
        mp.setattr(E, "FORMAT_VERSION", E.FORMAT_VERSION + 1)
        E.save(path, {"w": np.ones((2, 2), np.float32)})
    with pytest.raises(ValueError, match="newer"):
        E.load(path)


def test_refuses_foreign_files(tmp_dir):
    path = os.path.join(tmp_dir, "plain.safetensors")
    stn.save_file({"w": np.ones(3, np.float32)}, path)
    with pytest.raises(ValueError, match="not an obcjax-packed file"):
        E.load(path)
    path = _small_file(tmp_dir)
    _rewrite(path, edit_manifest=lambda m: m.update(format="something-else"))
    with pytest.raises(ValueError, match="not an obcjax-packed file"):
        E.load(path)


@pytest.mark.parametrize(
    "edit_manifest, edit_tensors, match",
    [
        (None, lambda t: t.pop("a:indices"), "missing"),
        (None, lambda t: t.update(extra=np.zeros(2, np.uint8)), "not in the manifest"),
        (None, lambda t: t.update({"c:codes": t["c:codes"][:-1]}), "does not match"),
        (
            None,
            lambda t: t.update({"b:values": t["b:values"].astype(np.float16)}),
            "does not match",
        ),
        (lambda m: m["layers"]["c"].update(bits=5), None, "does not match"),
        (lambda m: m["layers"]["a"].update(nm=[1, 4]), None, "does not match"),
        (lambda m: m["layers"]["c"].update(zero_dtype="float16"), None, "checksum mismatch"),
        (lambda m: m["layers"]["b"].pop("tensors"), None, "malformed"),
        (lambda m: m["layers"]["b"].pop("kind"), None, "does not match"),
    ],
)
def test_refuses_manifest_that_does_not_match(tmp_dir, edit_manifest, edit_tensors, match):
    path = _small_file(tmp_dir)
    _rewrite(path, edit_manifest, edit_tensors)
    with pytest.raises(ValueError, match=match):
        E.load(path)


def test_refuses_when_checksum_changes_only_one_layer(tmp_dir):
    """One bad layer fails the whole load: nothing comes back half-loaded."""
    path = _small_file(tmp_dir)

    def flip(t):
        v = t["b:values"].copy()
        v[0, 0] += 1.0
        t["b:values"] = v

    _rewrite(path, edit_tensors=flip)
    with pytest.raises(ValueError, match="checksum mismatch in layer 'b'"):
        E.load(path)


def test_pack_layer_refusals():
    rng = np.random.default_rng(8)
    W = rng.standard_normal((4, 8)).astype(np.float32)
    mask = rng.random((4, 8)) < 0.5
    with pytest.raises(ValueError, match="'fc'.*mask shape"):
        E.pack_layer(W, mask=mask[:, :4], name="fc")
    with pytest.raises(ValueError, match="'fc'.*nonzero where mask is False"):
        E.pack_layer(W, mask=mask, name="fc")
    with pytest.raises(ValueError, match="'fc'.*multiple of 3"):
        E.pack_layer(W, nm=(1, 3), name="fc")
    with pytest.raises(ValueError, match="'fc'.*keeps exactly 2"):
        E.pack_layer(np.where(mask, W, 0), mask=mask, nm=(2, 4), name="fc")
    with pytest.raises(ValueError, match="'fc'.*at most 2"):
        E.pack_layer(W, nm=(2, 4), name="fc")
    with pytest.raises(ValueError, match="'fc'.*0 < n < m"):
        E.pack_layer(W, nm=(4, 4), name="fc")
    q = _make_qarray(rng, 4, 8, 4, "channel")
    with pytest.raises(ValueError, match="'fc'.*quarter grid step"):
        E.pack_layer(_deq(q) + q.scale, qarray=q, name="fc")
    with pytest.raises(ValueError, match="'fc'.*outside"):
        E.pack_layer(None, qarray=q._replace(bits=2), name="fc")
    with pytest.raises(ValueError, match="'fc'.*scale/zero"):
        E.pack_layer(None, qarray=q._replace(scale=q.scale[:2]), name="fc")
    with pytest.raises(ValueError, match="'fc'.*dtype"):
        E.pack_layer(W, dtype="bfloat16", name="fc")
    with pytest.raises(ValueError, match="'fc'.*2-D"):
        E.pack_layer(W.reshape(2, 2, 8), nm=(2, 4), name="fc")


def test_unpack_refuses_inconsistent_layers():
    layer = E.pack_layer(np.ones((2, 8), np.float32), mask=np.ones((2, 8), bool))
    with pytest.raises(ValueError, match="stores 15"):
        E.unpack_layer(
            E.PackedLayer(
                **{
                    **vars(layer),
                    "nnz": 15,
                    "tensors": {
                        "mask": layer.tensors["mask"],
                        "values": layer.tensors["values"][:15],
                    },
                }
            )
        )
    layer = E.pack_layer(np.ones((1, 4), np.float32) * [1, 0, 1, 0], nm=(2, 4))
    dup = E.pack_bits(np.array([2, 2]), 2)  # the same position twice
    with pytest.raises(ValueError, match="strictly increasing"):
        E.unpack_layer(
            E.PackedLayer(
                **{**vars(layer), "tensors": {"indices": dup, "values": layer.tensors["values"]}}
            )
        )


# ----------------------------------------------------------------------------------------------
# atomic write
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crash_in", ["replace", "fsync"])
def test_atomic_write_survives_a_crash(tmp_path, monkeypatch, crash_in):
    path = tmp_path / "model.safetensors"
    E.save(path, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    with monkeypatch.context() as mp:
        mp.setattr(os, crash_in, crash)
        with pytest.raises(OSError, match="simulated crash"):
            E.save(path, {"w": np.zeros((50, 50), np.float32)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    layers, _ = E.load(path)
    assert _bits_equal(layers["w"].tensors["values"], np.arange(6, dtype=np.float32).reshape(2, 3))
    E.save(path, {"w": np.zeros((50, 50), np.float32)})  # a normal save replaces it
    assert E.load(path)[0]["w"].shape == (50, 50)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


# ----------------------------------------------------------------------------------------------
# whole params pytrees
# ----------------------------------------------------------------------------------------------


def _model_params(rng):
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    return {
        "Dense_0": {"kernel": f32(16, 8), "bias": f32(8)},
        "Conv_0": {"kernel": f32(3, 3, 2, 8), "bias": f32(8)},  # 2 groups of 4 output channels
        "Dense_1": {"kernel": f32(8, 8)},  # square: a transposition bug would go unseen by shape
        "BatchNorm_0": {
            "scale": f32(8).astype(np.float16),
            "bias": f32(8).astype(ml_dtypes.bfloat16),
        },
        "count": np.array(3, np.int32),
    }


def _compressed(params):
    """A hand-built obcjax.transforms.Compressed from real kernels (NM+w4, grouped w3, 50 %)."""
    import jax.numpy as jnp

    from obcjax import kernels as K
    from obcjax.layout import kernel_to_matrices, matrices_to_kernel
    from obcjax.specs import Unstructured
    from obcjax.transforms import Compressed, LayerSpec

    new = {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}
    k0 = params["Dense_0"]["kernel"]
    (W0,) = kernel_to_matrices(k0)
    r = K.magnitude_nm(W0, 2, 4)
    rq = K.rtn_quantize(r.weights, Int(4))
    new["Dense_0"]["kernel"] = np.asarray(matrices_to_kernel([rq.weights], k0.shape))
    mask0 = np.asarray(matrices_to_kernel([r.mask.astype(jnp.float32)], k0.shape)) > 0
    kc = params["Conv_0"]["kernel"]
    qs = [
        K.rtn_quantize(Wg, Int(3, granularity="group", group_size=9))
        for Wg in kernel_to_matrices(kc, 2)
    ]
    new["Conv_0"]["kernel"] = np.asarray(matrices_to_kernel([x.weights for x in qs], kc.shape))
    k1 = params["Dense_1"]["kernel"]
    r1 = K.magnitude_prune(kernel_to_matrices(k1)[0], 0.5)
    new["Dense_1"]["kernel"] = np.asarray(matrices_to_kernel([r1.weights], k1.shape))
    mask1 = np.asarray(matrices_to_kernel([r1.mask.astype(jnp.float32)], k1.shape)) > 0
    specs = {
        "Dense_0": LayerSpec(prune=NM(2, 4), quant=Int(4)),
        "Conv_0": LayerSpec(quant=Int(3, granularity="group", group_size=9)),
        "Dense_1": LayerSpec(prune=Unstructured(0.5)),
    }
    return Compressed.from_flat(
        new,
        {"Dense_0": mask0, "Dense_1": mask1},
        {"Dense_0": rq.qarray, "Conv_0": [x.qarray for x in qs]},  # matrix QArrays, per group
        {},
        specs,
        {},
    )


def test_params_roundtrip(tmp_path):
    params = _model_params(np.random.default_rng(9))
    out = _compressed(params)
    packed = E.pack_compressed(out)
    assert {k: v.kind for k, v in packed.items()} == {
        "Dense_0/kernel": "nm_quantized",
        "Conv_0/kernel": "quantized",
        "Dense_1/kernel": "sparse",
    }
    path = tmp_path / "model.safetensors"
    E.save_params(path, out.params, packed, metadata={"spec": "mixed"})
    back = E.load_params(path, like=params)
    flat_in, flat_out = E._flatten_params(out.params), E._flatten_params(back)
    assert set(flat_in) == set(flat_out)
    for p, v in flat_in.items():
        v = np.asarray(v)
        want = v.astype(np.float32) if p in packed else v
        assert _bits_equal(flat_out[p], want), p
    assert E.load(path)[1] == {"spec": "mixed"}
    # the packed kernels take a fraction of their dense bytes (the header dominates so tiny a file)
    dense_bytes = sum(np.asarray(flat_in[p]).nbytes for p in packed)
    assert sum(E.nbytes(v) for v in packed.values()) < 0.4 * dense_bytes
    dense = tmp_path / "dense.safetensors"
    E.save_params(dense, out.params)
    assert _bits_equal(E.load_params(dense)["Conv_0"]["kernel"], out.params["Conv_0"]["kernel"])


def test_loaded_params_drop_into_flax_apply(tmp_path):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(nn.relu(nn.Dense(16)(x)))

    model = MLP()
    x = jnp.asarray(np.random.default_rng(10).standard_normal((5, 8)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    kernel = np.asarray(params["Dense_0"]["kernel"])
    W = kernel.T
    mask = _nm_mask(np.random.default_rng(11), *W.shape, 2, 4)
    Wp = np.where(mask, W, 0).astype(np.float32)
    new = jax.tree.map(lambda a: a, params)
    new = {**new, "Dense_0": {**new["Dense_0"], "kernel": jnp.asarray(Wp.T)}}
    path = tmp_path / "mlp.safetensors"
    E.save_params(path, new, {"Dense_0/kernel": E.pack_layer(Wp, mask=mask, nm=(2, 4))})
    loaded = E.load_params(path, like=params)
    assert np.array_equal(model.apply({"params": loaded}, x), model.apply({"params": new}, x))


def test_params_refusals(tmp_path):
    params = _model_params(np.random.default_rng(12))
    path = tmp_path / "m.safetensors"
    k = params["Dense_0"]["kernel"]
    with pytest.raises(ValueError, match="not leaves of params"):
        E.save_params(path, params, {"Dense_0": E.pack_layer(k.T)})
    with pytest.raises(ValueError, match=r"'Dense_0/kernel'.*reshape\(-1, out\).T"):
        E.save_params(path, params, {"Dense_0/kernel": E.pack_layer(k)})
    E.save_params(path, params)
    other = {**params, "Dense_2": {"kernel": np.zeros((8, 2), np.float32)}}
    with pytest.raises(ValueError, match=r"missing from the file \['Dense_2/kernel'\]"):
        E.load_params(path, like=other)
    fewer = {k: v for k, v in params.items() if k != "count"}
    with pytest.raises(ValueError, match=r"not in the model \['count'\]"):
        E.load_params(path, like=fewer)
    reshaped = {**params, "Dense_0": {**params["Dense_0"], "bias": np.zeros(9, np.float32)}}
    with pytest.raises(ValueError, match="Dense_0/bias: file \\(8,\\) vs model \\(9,\\)"):
        E.load_params(path, like=reshaped)
    plain = tmp_path / "plain.safetensors"
    E.save(plain, {"w": np.ones(2, np.float32)})
    with pytest.raises(ValueError, match="no params tree"):
        E.load_params(plain)


def test_manifest_records_the_layout(tmp_dir):
    path = _small_file(tmp_dir)
    with safe_open(path, framework="np") as f:
        manifest = json.loads(f.metadata()[E._MANIFEST_KEY])
    assert manifest["format"] == E.FORMAT_NAME and manifest["format_version"] == E.FORMAT_VERSION
    a = manifest["layers"]["a"]
    assert (a["kind"], a["shape"], a["bits"], a["nm"], a["group_size"]) == (
        "nm_quantized",
        [8, 16],
        4,
        [2, 4],
        16,
    )
    assert a["tensors"]["indices"]["nbytes"] == math.ceil(8 * 8 * 2 / 8)
    assert a["tensors"]["codes"]["nbytes"] == 8 * 8 * 4 // 8
    assert a["checksum"].startswith("sha256:")
    assert a["nbytes"] == sum(t["nbytes"] for t in a["tensors"].values())
    # every tensor carries its own SHA-256; one digest covers the manifest and the metadata
    assert all(len(t["sha256"]) == 64 for t in a["tensors"].values())
    with safe_open(path, framework="np") as f:
        assert f.metadata()[E._DIGEST_KEY] == E._digest(manifest, None)
