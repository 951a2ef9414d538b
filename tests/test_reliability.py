"""Reliability of what obcjax writes and reads: no silent corruption, clear errors, safe saves.

* a byte-flip fuzz of packed files (every header byte, a sample of the data): each flip either
  loads the exact original or raises :class:`obcjax.fileio.CorruptedFileError`;
* bf16 / f16 / f32 params round-trip bit for bit through compress -> pack -> save -> load;
* kill tests: a ``SIGKILL`` at a random point of a save and of a database build loses nothing,
  leaves the old file whole, and the next write removes the dead writer's temporary file;
* a table of bad inputs to export and to the database, each with its error type and a message
  that names the file, the field or the layer.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as stn
from safetensors import safe_open

from obcjax import export as E
from obcjax import fileio
from obcjax.fileio import CorruptedFileError
from obcjax.quant import QArray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METADATA = {"spec": "mixed", "numbers": [1, 2.5, -3e-7], "nested": {"ok": True, "s": "x"}}


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def _nm_mask(rng, rows, cols, n, m):
    ranks = np.argsort(np.argsort(rng.random((rows, cols // m, m)), -1), -1)
    return (ranks < m - n).reshape(rows, cols)


def _model():
    """Params (square and rectangular Dense, a plain and a 2-group conv, half-precision leaves)
    and packed kernels for three of them (sparse, 2:4 + 4-bit, 3-bit groups)."""
    rng = np.random.default_rng(0)

    def f32(*s):
        return rng.standard_normal(s).astype(np.float32)

    W0 = f32(8, 8)
    m0 = rng.random(W0.shape) < 0.5
    W0 = np.where(m0, W0, 0).astype(np.float32)
    m1 = _nm_mask(rng, 8, 16, 2, 4)
    c1 = rng.integers(0, 16, (8, 16)).astype(np.uint8)
    s1 = (rng.random((8, 1)) + 0.1).astype(np.float32)
    z1 = np.full((8, 1), 8.0, np.float32)
    c1 = np.where(m1, c1, 8).astype(np.uint8)
    q1 = QArray(c1, s1, z1, 4, 16)
    W1 = np.where(m1, s1 * (c1.astype(np.float32) - z1), 0).astype(np.float32)
    c2 = rng.integers(0, 8, (8, 18)).astype(np.uint8)
    s2 = (rng.random((8, 2)) + 0.1).astype(np.float32)
    z2 = rng.integers(0, 8, (8, 2)).astype(np.float32)
    q2 = QArray(c2, s2, z2, 3, 9)
    W2 = (np.repeat(s2, 9, 1) * (c2.astype(np.float32) - np.repeat(z2, 9, 1))).astype(np.float32)
    params = {
        "Dense_0": {"kernel": W0.T.copy(), "bias": f32(8)},  # square: a transposition shows
        "Dense_1": {"kernel": W1.T.copy(), "bias": f32(8).astype(ml_dtypes.bfloat16)},
        "Conv_0": {"kernel": W2.T.reshape(3, 3, 2, 8).copy(), "bias": f32(8).astype(np.float16)},
        "Conv_1": {"kernel": f32(3, 3, 4, 8)},
        "count": np.array(7, np.int32),
    }
    packed = {
        "Dense_0/kernel": E.pack_layer(W0, mask=m0),
        "Dense_1/kernel": E.pack_layer(W1, mask=m1, qarray=q1, nm=(2, 4)),
        "Conv_0/kernel": E.pack_layer(W2, qarray=q2),
    }
    return params, packed


@pytest.fixture(scope="module")
def model():
    return _model()


def _saved(tmp_path, model, packed=True, name="m.safetensors"):
    params, layers = model
    path = tmp_path / name
    E.save_params(path, params, layers if packed else None, metadata=METADATA)
    return path


# ----------------------------------------------------------------------------------------------
# (a) byte-flip fuzz
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_byte_flip_fuzz_never_loads_a_different_model(tmp_path, model, packed):
    """Every header byte (one random bit each) and 300 data bytes: original or CorruptedFileError."""
    path = _saved(tmp_path, model, packed)
    ref_manifest, ref_layers, ref_meta = E._read(path)
    ref_params = E.load_params(path)
    assert ref_meta == METADATA
    data = path.read_bytes()
    hlen = int.from_bytes(data[:8], "little")
    rng = np.random.default_rng(1 + packed)
    offsets = list(range(8 + hlen))
    offsets += sorted(rng.choice(np.arange(8 + hlen, len(data)), 300, replace=False).tolist())
    fuzzed = tmp_path / "fuzzed.safetensors"
    fuzzed.write_bytes(data)
    same, errors, silent, other = 0, 0, [], []
    fd = os.open(fuzzed, os.O_RDWR)
    try:
        for i in offsets:
            flipped = data[i] ^ (1 << int(rng.integers(8)))
            os.pwrite(fd, bytes([flipped]), i)  # in place: rewriting the file is 10x slower
            try:
                manifest, layers, meta = E._read(fuzzed)
            except CorruptedFileError:
                errors += 1
                continue
            except Exception as e:  # any other error type is a failure of the contract
                other.append((i, f"{type(e).__name__}: {e}"))
                continue
            finally:
                os.pwrite(fd, data[i : i + 1], i)
            ok = (
                manifest == ref_manifest
                and meta == ref_meta
                and list(layers) == list(ref_layers)
                and all(
                    layers[n].spec == ref_layers[n].spec
                    and set(layers[n].tensors) == set(ref_layers[n].tensors)
                    and all(
                        _same(t, ref_layers[n].tensors[p]) for p, t in layers[n].tensors.items()
                    )
                    for n in layers
                )
            )
            if ok:  # the public loaders must agree too
                os.pwrite(fd, bytes([flipped]), i)
                try:
                    back = _flat(E.load_params(fuzzed))
                    ok = back.keys() == _flat(ref_params).keys() and all(
                        _same(v, _flat(ref_params)[k]) for k, v in back.items()
                    )
                    ok = ok and E.load(fuzzed)[1] == METADATA
                finally:
                    os.pwrite(fd, data[i : i + 1], i)
            if ok:
                same += 1
            else:
                silent.append((i, data[max(0, i - 20) : i + 20]))
    finally:
        os.close(fd)
    assert not silent, f"{len(silent)} flips loaded a different model: {silent[:3]}"
    assert not other, f"{len(other)} flips raised another error type: {other[:3]}"
    assert same + errors == len(offsets)


def test_every_header_field_is_covered_by_the_digest(tmp_path, model):
    """The cases of the issue: a layout, a shape, user metadata edited (checksums left as is)."""
    path = _saved(tmp_path, model)

    def edit(fn, key=E._MANIFEST_KEY):
        with safe_open(path, framework="np") as f:
            header = dict(f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        value = json.loads(header[key])
        fn(value)
        header[key] = json.dumps(value)
        out = tmp_path / "edited.safetensors"
        stn.save_file(tensors, out, metadata=header)
        return out

    cases = [
        lambda m: m["params"]["Dense_0/kernel"].update(layout="identity"),
        lambda m: m["params"]["Conv_1/kernel"].update(shape=[1, 9, 4, 8]),
        lambda m: m["params"]["Dense_1/bias"].update(dtype="float32"),
        lambda m: m["params"]["Dense_0/bias"].update(packed=True),
        lambda m: m.update(obcjax_version="0.0.0"),
    ]
    for fn in cases:
        with pytest.raises(CorruptedFileError, match=r"edited\.safetensors.*obcjax\.digest"):
            E.load_params(edit(fn))
    for fn in (lambda d: d.update(spec="other"), lambda d: d.pop("nested")):
        with pytest.raises(CorruptedFileError, match="obcjax.digest"):
            E.load(edit(fn, E._METADATA_KEY))


# ----------------------------------------------------------------------------------------------
# (b) dtypes round-trip bit for bit
# ----------------------------------------------------------------------------------------------


def _compress_case(dtype):
    """A compress() result of a model in ``dtype``: every kernel's matrices are (8, 16), so each
    solver compiles once (magnitude baselines for the Dense layers, GPTQ for the grouped conv)."""
    import jax.numpy as jnp

    from obcjax.specs import NM, Int, Unstructured
    from obcjax.stats import HessianState
    from obcjax.transforms import LayerSpec, compress

    rng = np.random.default_rng(3)

    def H(groups, cols):
        X = rng.standard_normal((groups, 64, cols))
        return HessianState(
            jnp.asarray(np.einsum("gti,gtj->gij", X, X), jnp.float32), jnp.asarray(64, jnp.int32)
        )

    def w(*s):
        return jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)

    params = {
        "Dense_0": {"kernel": w(16, 8), "bias": w(8)},
        "Dense_1": {"kernel": w(16, 8), "bias": w(8)},
        "Dense_2": {"kernel": w(16, 8)},
        "Conv_0": {"kernel": w(2, 2, 4, 16)},  # two feature groups of 8 output channels
    }
    stats = {"Dense_0": H(1, 16), "Dense_1": H(1, 16), "Dense_2": H(1, 16), "Conv_0": H(2, 16)}
    rules = [
        ("Dense_0", LayerSpec(prune=Unstructured(0.5), solver="magnitude")),
        ("Dense_1", LayerSpec(prune=NM(2, 4), quant=Int(4), solver="magnitude")),
        ("Dense_2", LayerSpec(prune=NM(2, 4), solver="magnitude")),
        ("Conv_0", LayerSpec(quant=Int(3, granularity="group", group_size=8), solver="gptq")),
    ]
    return params, compress(params, stats, rules)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_half_precision_params_roundtrip_bit_exact(tmp_path, dtype):
    """compress -> pack_compressed -> save_params -> load_params gives the compressed params."""
    params, out = _compress_case(getattr(ml_dtypes, dtype, None) or np.dtype(dtype))
    packed = E.pack_compressed(out)
    assert {k: v.kind for k, v in packed.items()} == {
        "Dense_0/kernel": "sparse",
        "Dense_1/kernel": "nm_quantized",
        "Dense_2/kernel": "nm",
        "Conv_0/kernel": "quantized",
    }
    path = tmp_path / "m.safetensors"
    E.save_params(path, out.params, packed)
    back = _flat(E.load_params(path, like=params))
    want = _flat(out.params)
    assert back.keys() == want.keys()
    for k, v in want.items():
        v = np.asarray(v)
        assert v.dtype.name == dtype
        assert _same(back[k], v), k
    # values of the unquantized kinds are stored in the kernel's own dtype (no float32 blow-up)
    assert packed["Dense_2/kernel"].tensors["values"].dtype.name == dtype
    # and plain save/load keeps every dtype too
    E.save(path, {k: np.asarray(v) for k, v in want.items()})
    layers, _ = E.load(path)
    assert all(_same(layers[k].tensors["values"], np.asarray(v)) for k, v in want.items())


# ----------------------------------------------------------------------------------------------
# (c) kill tests
# ----------------------------------------------------------------------------------------------

_SAVE_CHILD = """
import sys
import numpy as np
from obcjax import export as E
path = sys.argv[1]
print("ready", flush=True)
i = 1
while True:
    E.save(path, {"w": np.full((256, 1024), float(i), np.float32)}, metadata={"i": i})
    i += 1
"""

_DB_CHILD = """
import sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from tests.test_reliability import _db_inputs
from obcjax.allocation import build_database
params, stats, levels = _db_inputs(12)
def ready(path, record):  # the solvers are compiled: what is left is mostly writing files
    if path == "dense_0":
        print("ready", flush=True)
build_database(params, stats, levels, path=sys.argv[1], progress=False, callback=ready)
"""


def _db_inputs(n_layers=4):
    import jax.numpy as jnp

    from obcjax.specs import Int, Unstructured
    from obcjax.stats import HessianState
    from obcjax.transforms import LayerSpec

    rng = np.random.default_rng(5)
    params, stats = {}, {}
    for i in range(n_layers):
        params[f"dense_{i}"] = {"kernel": jnp.asarray(rng.normal(size=(16, 16)), jnp.float32)}
        X = rng.normal(size=(1, 48, 16))
        stats[f"dense_{i}"] = HessianState(
            jnp.asarray(np.einsum("gti,gtj->gij", X, X), jnp.float32), jnp.asarray(48, jnp.int32)
        )
    # the baselines compile in a fraction of the time of ExactOBS/OBQ; the files are the same
    levels = [
        None,
        LayerSpec(prune=Unstructured(0.5), solver="magnitude"),
        LayerSpec(quant=Int(4), solver="magnitude"),
    ]
    return params, stats, levels


def _spawn(code, arg):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(arg)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return p


def _kill_after_ready(procs_delays):
    """SIGKILL each child ``delay`` seconds after it prints 'ready' (all children at once)."""
    import threading

    errors = []

    def watch(p, delay):
        line = p.stdout.readline()
        if line.strip() != "ready":
            p.wait(timeout=60)
            errors.append(p.stderr.read())
            return
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)

    threads = [threading.Thread(target=watch, args=pd) for pd in procs_delays]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for p, _ in procs_delays:
        p.wait(timeout=60)  # reaped: its pid is gone, so its temporary file counts as stale
        p.stdout.close()
        p.stderr.close()
    assert not errors, errors


def _temps(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp") or n.startswith(".tmp"))


def test_sigkill_during_saves_loses_nothing(tmp_path):
    seeds = (0, 1, 2)
    rng = np.random.default_rng(11)
    runs = []
    for s in seeds:
        d = tmp_path / f"run{s}"
        d.mkdir()
        E.save(d / "m.safetensors", {"w": np.full((256, 1024), 0.0, np.float32)}, metadata={"i": 0})
        runs.append((_spawn(_SAVE_CHILD, d / "m.safetensors"), float(rng.uniform(0.05, 0.6))))
    _kill_after_ready(runs)
    for s in seeds:
        d = tmp_path / f"run{s}"
        layers, meta = E.load(d / "m.safetensors")  # whole: the old file or a new one
        w = layers["w"].tensors["values"]
        assert w.shape == (256, 1024) and np.all(w == float(meta["i"]))
        E.save(d / "m.safetensors", {"w": np.ones(3, np.float32)})  # the next write cleans up
        assert os.listdir(d) == ["m.safetensors"], os.listdir(d)


def test_sigkill_during_database_build_loses_nothing(tmp_path):
    from obcjax.allocation import build_database

    rng = np.random.default_rng(12)
    seeds = (0, 1)
    runs = [(_spawn(_DB_CHILD, tmp_path / f"db{s}"), float(rng.uniform(0.0, 0.3))) for s in seeds]
    params, stats, levels = _db_inputs(12)  # the reference, while the children start
    full = build_database(params, stats, levels, progress=False)
    _kill_after_ready(runs)
    for s, (proc, _) in zip(seeds, runs):
        root = tmp_path / f"db{s}"
        root.mkdir(exist_ok=True)
        done = [n for n in os.listdir(root) if n.endswith(".npz")]
        # what a kill inside a write leaves (the dead child's pid in the name), for every layer
        # still to do: the resumed build must remove each when it writes that layer
        for p in sorted(set(params) - {n[: -len(".npz")] for n in done}):
            (root / f".{p}.npz.{proc.pid}.0123456789ab.tmp").write_bytes(b"PK\x03\x04partial")
        db = build_database(params, stats, levels, path=root, progress=False)
        assert sorted(db.loaded) == sorted(n[: -len(".npz")] for n in done)
        assert sorted(db.loaded + db.computed) == sorted(params)
        for p in params:
            a, b = db.records[p], full.records[p]
            np.testing.assert_array_equal(a.loss, b.loss)
            np.testing.assert_array_equal(a.nnz, b.nnz)
            for lv in levels:
                np.testing.assert_array_equal(db.weights(p, lv), full.weights(p, lv))
        assert _temps(root) == []  # a killed writer's temporary file went with the next write
        assert sorted(os.listdir(root)) == sorted(f"{p}.npz" for p in params)


def test_stale_temp_files_of_live_writers_are_kept(tmp_path):
    target = tmp_path / "m.safetensors"
    mine = tmp_path / f".m.safetensors.{os.getpid()}.abcdef.tmp"  # a live writer: this process
    dead = tmp_path / ".m.safetensors.999999999.abcdef.tmp"  # no such process
    other = tmp_path / ".other.safetensors.999999999.abcdef.tmp"  # another target
    for f in (mine, dead, other):
        f.write_bytes(b"x")
    E.save(target, {"w": np.zeros(2, np.float32)})
    assert sorted(os.listdir(tmp_path)) == sorted([target.name, mine.name, other.name])
    old = time.time() - 2 * 24 * 3600
    os.utime(mine, (old, old))  # older than a day: stale whoever wrote it
    assert fileio.stale_temp_files(target) == [str(mine)]


# ----------------------------------------------------------------------------------------------
# (d) bad inputs: export
# ----------------------------------------------------------------------------------------------


def _edit_header(path, manifest=None, metadata=None, header=None, tensors=None, redigest=False):
    """Rewrite a saved file with edits and load it; ``redigest``: a crafted file, digest redone."""
    with safe_open(path, framework="np") as f:
        h = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}
    m = json.loads(h[E._MANIFEST_KEY])
    md = json.loads(h[E._METADATA_KEY]) if E._METADATA_KEY in h else None
    if manifest:
        manifest(m)
    if metadata:
        metadata(md)
    h[E._MANIFEST_KEY] = json.dumps(m)
    if md is not None:
        h[E._METADATA_KEY] = json.dumps(md)
    if redigest:
        h[E._DIGEST_KEY] = E._digest(m, md)
    if header:
        header(h)
    if tensors:
        tensors(ts)
    stn.save_file(ts, path, metadata=h)
    return E.load_params(path)


def _flip_data_byte(path, back=1):
    data = bytearray(path.read_bytes())
    data[-back] ^= 0x04
    path.write_bytes(bytes(data))


def _set(d, key, value):
    d[key] = value


def _prm(p, field, value):
    return lambda m: _set(m["params"][p], field, value)


def _drop_tensor_key(m):
    del m["layers"]["Dense_0/kernel"]["tensors"]["mask"]["key"]


# (id, action(tmp_path, model) -> anything, error type, pattern that the message must match)
_EXPORT_CASES = [
    ("save-to-dir", lambda t, m: E.save(t, {"w": np.ones(2)}), IsADirectoryError, "is a directory"),
    (
        "save-params-to-dir",
        lambda t, m: E.save_params(t, m[0]),
        IsADirectoryError,
        "is a directory",
    ),
    (
        "save-missing-folder",
        lambda t, m: E.save(t / "nope" / "m.safetensors", {"w": np.ones(2)}),
        FileNotFoundError,
        r"nope/m\.safetensors.*does not exist",
    ),
    (
        "save-parent-is-file",
        lambda t, m: E.save(_saved(t, m) / "x.safetensors", {"w": np.ones(2)}),
        NotADirectoryError,
        r"m\.safetensors/x\.safetensors",
    ),
    (
        "save-read-only",
        lambda t, m: (
            os.chmod(_saved(t, m), 0o444),
            E.save(t / "m.safetensors", {"w": np.ones(2)}),
        ),
        PermissionError,
        r"read-only.*m\.safetensors.*overwrite_readonly=True",
    ),
    (
        "save-params-read-only",
        lambda t, m: (os.chmod(_saved(t, m), 0o444), E.save_params(t / "m.safetensors", m[0])),
        PermissionError,
        r"m\.safetensors.*overwrite_readonly",
    ),
    ("save-path-none", lambda t, m: E.save(None, {"w": np.ones(2)}), TypeError, "path"),
    (
        "save-metadata-not-json",
        lambda t, m: E.save(t / "m.safetensors", {"w": np.ones(2)}, metadata={"f": object()}),
        TypeError,
        "metadata must be JSON",
    ),
    (
        "save-metadata-not-dict",
        lambda t, m: E.save(t / "m.safetensors", {"w": np.ones(2)}, metadata=[1]),
        TypeError,
        "metadata must be a dict",
    ),
    (
        "save-layers-not-mapping",
        lambda t, m: E.save(t / "m.safetensors", [np.ones(2)]),
        TypeError,
        "layers must be a mapping",
    ),
    (
        "save-string-weights",
        lambda t, m: E.save(t / "m.safetensors", {"w": np.array(["a", "b"])}),
        TypeError,
        "'w'.*numeric",
    ),
    (
        "pack-bf16-storage",
        lambda t, m: E.pack_layer(np.ones((2, 2), np.float32), dtype="bfloat16", name="fc"),
        ValueError,
        "'fc'.*dtype",
    ),
    (
        "save-params-packed-not-layer",
        lambda t, m: E.save_params(t / "m.safetensors", m[0], {"Dense_0/kernel": np.ones(3)}),
        TypeError,
        "'Dense_0/kernel'.*PackedLayer",
    ),
    (
        "save-params-packed-wrong-shape",
        lambda t, m: E.save_params(
            t / "m.safetensors", m[0], {"Dense_1/kernel": E.pack_layer(np.ones((16, 8)))}
        ),
        ValueError,
        r"'Dense_1/kernel'.*\(8, 16\)",
    ),
    ("load-dir", lambda t, m: E.load(t), IsADirectoryError, "is a directory"),
    (
        "load-params-dir",
        lambda t, m: E.load_params(t),
        IsADirectoryError,
        "is a directory, not a file",
    ),
    (
        "load-missing",
        lambda t, m: E.load(t / "nope.safetensors"),
        FileNotFoundError,
        r"no such file.*nope\.safetensors",
    ),
    (
        "load-empty",
        lambda t, m: (_saved(t, m).write_bytes(b""), E.load(t / "m.safetensors")),
        CorruptedFileError,
        r"m\.safetensors.*truncated or corrupted",
    ),
    (
        "load-truncated",
        lambda t, m: (
            (t / "m.safetensors").write_bytes(_saved(t, m).read_bytes()[:-5]),
            E.load(t / "m.safetensors"),
        ),
        CorruptedFileError,
        "truncated or corrupted",
    ),
    (
        "load-plain-safetensors",
        lambda t, m: (
            stn.save_file({"w": np.ones(2, np.float32)}, t / "p.safetensors"),
            E.load(t / "p.safetensors"),
        ),
        ValueError,
        r"p\.safetensors.*not an obcjax-packed file",
    ),
    (
        "load-params-of-plain-save",
        lambda t, m: (
            E.save(t / "p.safetensors", {"w": np.ones(2)}),
            E.load_params(t / "p.safetensors"),
        ),
        ValueError,
        "no params tree",
    ),
    (
        "manifest-key-missing",
        lambda t, m: _edit_header(_saved(t, m), header=lambda h: h.pop(E._MANIFEST_KEY)),
        CorruptedFileError,
        "'obcjax.manifest' missing",
    ),
    (
        "metadata-not-json",
        lambda t, m: _edit_header(_saved(t, m), header=lambda h: _set(h, E._METADATA_KEY, "{x")),
        CorruptedFileError,
        "'obcjax.metadata' is not valid JSON",
    ),
    (
        "metadata-not-object",
        lambda t, m: _edit_header(_saved(t, m), header=lambda h: _set(h, E._METADATA_KEY, "[1]")),
        CorruptedFileError,
        "'obcjax.metadata' is not a JSON object",
    ),
    (
        "metadata-value-edited",
        lambda t, m: _edit_header(_saved(t, m), metadata=lambda d: _set(d, "spec", "2:4")),
        CorruptedFileError,
        r"m\.safetensors.*'obcjax\.digest'",
    ),
    (
        "metadata-removed",
        lambda t, m: _edit_header(_saved(t, m), header=lambda h: h.pop(E._METADATA_KEY)),
        CorruptedFileError,
        "'obcjax.digest'",
    ),
    (
        "digest-missing",
        lambda t, m: _edit_header(_saved(t, m), header=lambda h: h.pop(E._DIGEST_KEY)),
        CorruptedFileError,
        "no digest.*'obcjax.digest' missing",
    ),
    (
        "digest-edited",
        lambda t, m: _edit_header(
            _saved(t, m), header=lambda h: _set(h, E._DIGEST_KEY, "sha256:0")
        ),
        CorruptedFileError,
        "'obcjax.digest'",
    ),
    (
        "layout-flipped",
        lambda t, m: _edit_header(_saved(t, m), _prm("Dense_0/kernel", "layout", "identity")),
        CorruptedFileError,
        "digest",
    ),
    (
        "layout-crafted",
        lambda t, m: _edit_header(
            _saved(t, m), _prm("Dense_0/kernel", "layout", "kernal"), redigest=True
        ),
        CorruptedFileError,
        r"'params\.Dense_0/kernel\.layout'",
    ),
    (
        "shape-edited",
        lambda t, m: _edit_header(_saved(t, m), _prm("Conv_0/kernel", "shape", [1, 9, 2, 8])),
        CorruptedFileError,
        "digest over the manifest",
    ),
    (
        "shape-crafted",
        lambda t, m: _edit_header(
            _saved(t, m), _prm("Conv_0/kernel", "shape", [3, 3, 2, 4]), redigest=True
        ),
        CorruptedFileError,
        r"'Conv_0/kernel' cannot be decoded",
    ),
    (
        "shape-not-ints",
        lambda t, m: _edit_header(_saved(t, m), _prm("Conv_0/bias", "shape", [8.5]), redigest=True),
        CorruptedFileError,
        r"'params\.Conv_0/bias\.shape'",
    ),
    (
        "dtype-unknown",
        lambda t, m: _edit_header(
            _saved(t, m), _prm("Dense_1/bias", "dtype", "float99"), redigest=True
        ),
        CorruptedFileError,
        r"'params\.Dense_1/bias\.dtype'",
    ),
    (
        "dtype-object",
        lambda t, m: _edit_header(
            _saved(t, m), _prm("Dense_1/bias", "dtype", "object"), redigest=True
        ),
        CorruptedFileError,
        r"'params\.Dense_1/bias\.dtype'",
    ),
    (
        "packed-flag-not-bool",
        lambda t, m: _edit_header(_saved(t, m), _prm("count", "packed", "no"), redigest=True),
        CorruptedFileError,
        r"'params\.count\.packed'",
    ),
    (
        "params-entry-missing",
        lambda t, m: _edit_header(
            _saved(t, m), lambda x: x["params"].pop("Conv_1/kernel"), redigest=True
        ),
        CorruptedFileError,
        "params table does not match",
    ),
    (
        "tensor-key-missing",
        lambda t, m: _edit_header(_saved(t, m), _drop_tensor_key),
        CorruptedFileError,
        "'Dense_0/kernel' is malformed",
    ),
    (
        "layer-kind-missing",
        lambda t, m: _edit_header(_saved(t, m), lambda x: x["layers"]["Conv_0/kernel"].pop("kind")),
        CorruptedFileError,
        "tensors of layer 'Conv_0/kernel'.*'kind'",
    ),
    (
        "layer-kind-unknown",
        lambda t, m: _edit_header(
            _saved(t, m), lambda x: _set(x["layers"]["Conv_0/kernel"], "kind", "fancy")
        ),
        CorruptedFileError,
        "layer 'Conv_0/kernel'.*unknown kind",
    ),
    (
        "zero-dtype-unknown",
        lambda t, m: _edit_header(
            _saved(t, m), lambda x: _set(x["layers"]["Conv_0/kernel"], "zero_dtype", "float99")
        ),
        CorruptedFileError,
        "layer 'Conv_0/kernel'.*float99",
    ),
    (
        "layers-table-missing",
        lambda t, m: _edit_header(_saved(t, m), lambda x: _set(x, "layers", [])),
        CorruptedFileError,
        "no layer table",
    ),
    (
        "format-version-text",
        lambda t, m: _edit_header(_saved(t, m), lambda x: _set(x, "format_version", "2")),
        CorruptedFileError,
        "format_version",
    ),
    (
        "format-version-damaged-newer",
        lambda t, m: _edit_header(_saved(t, m), lambda x: _set(x, "format_version", 7)),
        CorruptedFileError,
        "'format_version' says 7.*digest does not verify",
    ),
    (
        "format-renamed",
        lambda t, m: _edit_header(_saved(t, m), lambda x: _set(x, "format", "obcjax-pecked")),
        CorruptedFileError,
        "not an obcjax-packed file.*'format'",
    ),
    (
        "layer-checksum-edited",
        lambda t, m: _edit_header(
            _saved(t, m), lambda x: _set(x["layers"]["Dense_0/bias"], "checksum", "sha256:0")
        ),
        CorruptedFileError,
        r"checksum mismatch in layer 'Dense_0/bias'.*layers\.Dense_0/bias\.checksum",
    ),
    (
        "tensor-sha-edited",
        lambda t, m: _edit_header(
            _saved(t, m),
            lambda x: _set(x["layers"]["Conv_1/kernel"]["tensors"]["values"], "sha256", "0"),
        ),
        CorruptedFileError,
        "checksum mismatch in layer 'Conv_1/kernel', tensor 'values'",
    ),
    (
        "tensor-bytes-flipped",
        lambda t, m: (_flip_data_byte(_saved(t, m)), E.load_params(t / "m.safetensors")),
        CorruptedFileError,
        r"m\.safetensors.*checksum mismatch in layer",
    ),
    (
        "tensor-missing",
        lambda t, m: _edit_header(_saved(t, m), tensors=lambda ts: ts.pop("count:values")),
        CorruptedFileError,
        r"missing \['count:values'\]",
    ),
    (
        "tensor-extra",
        lambda t, m: _edit_header(_saved(t, m), tensors=lambda ts: _set(ts, "x", np.ones(2))),
        CorruptedFileError,
        r"not in the manifest \['x'\]",
    ),
    (
        "tensor-dtype-changed",
        lambda t, m: _edit_header(
            _saved(t, m),
            tensors=lambda ts: _set(ts, "count:values", ts["count:values"].view(np.float32)),
        ),
        CorruptedFileError,
        "does not match tensor 'values' of layer 'count'",
    ),
]


@pytest.mark.parametrize(
    "action, exc, pattern", [c[1:] for c in _EXPORT_CASES], ids=[c[0] for c in _EXPORT_CASES]
)
def test_export_bad_inputs(tmp_path, model, action, exc, pattern):
    with pytest.raises(exc) as info:
        action(tmp_path, model)
    assert type(info.value) is exc
    assert re.search(pattern, str(info.value)), str(info.value)


def test_overwrite_readonly_keeps_the_mode(tmp_path, model):
    path = _saved(tmp_path, model)
    os.chmod(path, 0o444)
    E.save(path, {"w": np.arange(3, dtype=np.float32)}, overwrite_readonly=True)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o444)
    assert _same(E.load(path)[0]["w"].tensors["values"], np.arange(3, dtype=np.float32))
    os.chmod(path, 0o640)
    E.save(path, {"w": np.zeros(3, np.float32)})  # a replaced file keeps its permission bits
    assert os.stat(path).st_mode & 0o777 == 0o640


def test_full_disk_names_the_path_and_leaves_the_old_file(tmp_path, model, monkeypatch):
    path = _saved(tmp_path, model)
    before = path.read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as mp:
        mp.setattr(os, "fsync", full)
        with pytest.raises(OSError) as info:
            E.save(path, {"w": np.zeros(100, np.float32)})
    assert info.value.errno == errno.ENOSPC
    assert repr(str(path)) in str(info.value) and ".tmp" not in str(info.value)
    assert "No space left" in str(info.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_legacy_version_1_files_still_load(tmp_path, model):
    """A file of format version 1 (no per-tensor SHA-256, no digest) loads as before."""
    path = _saved(tmp_path, model)
    with safe_open(path, framework="np") as f:
        h = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}
    m = json.loads(h[E._MANIFEST_KEY])
    m["format_version"] = 1
    for rec in m["layers"].values():
        for trec in rec["tensors"].values():
            del trec["sha256"]
        parts = {p: ts[trec["key"]] for p, trec in rec["tensors"].items()}
        rec["checksum"] = E._checksum(rec, parts)
    h[E._MANIFEST_KEY] = json.dumps(m)
    del h[E._DIGEST_KEY]
    stn.save_file(ts, path, metadata=h)
    back = _flat(E.load_params(path))
    assert all(
        _same(back[k], v)
        for k, v in _flat(E.load_params(_saved(tmp_path, model, name="n"))).items()
    )
    # and a damaged version 1 file is still refused
    _flip_data_byte(path)
    with pytest.raises(CorruptedFileError, match="checksum mismatch"):
        E.load(path)


# ----------------------------------------------------------------------------------------------
# (d) bad inputs: the database
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def db_folder(tmp_path_factory):
    from obcjax.allocation import build_database

    root = tmp_path_factory.mktemp("db") / "db"
    params, stats, levels = _db_inputs(2)
    db = build_database(params, stats, levels, path=root, progress=False)
    return root, (params, stats, levels), db


def _db_copy(tmp_path, db_folder):
    root = tmp_path / "db"
    shutil.copytree(db_folder[0], root)
    return root


def _rezip(fname, edit):
    """Rewrite an .npz with ``edit({member: bytes})`` applied (zip CRCs made consistent)."""
    with zipfile.ZipFile(fname) as z:
        members = {n: z.read(n) for n in z.namelist()}
    edit(members)
    with zipfile.ZipFile(fname, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)


def _npy(arr) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def _member_offset(fname, member):
    with zipfile.ZipFile(fname) as z:
        info = z.getinfo(member + ".npy")
    data = open(fname, "rb").read()
    local = info.header_offset
    nlen = int.from_bytes(data[local + 26 : local + 28], "little")
    xlen = int.from_bytes(data[local + 28 : local + 30], "little")
    return local + 30 + nlen + xlen, info.file_size


def _flip_member(fname, member, at=-3):
    start, size = _member_offset(fname, member)
    data = bytearray(open(fname, "rb").read())
    data[start + (size + at if at < 0 else at)] ^= 0x10
    open(fname, "wb").write(bytes(data))


def _meta_text(ms) -> str:
    import io

    return str(np.lib.format.read_array(io.BytesIO(ms["meta.npy"])))


def _meta_edit(fn, rehash=False):
    """An edit of the meta dict; ``rehash`` updates ``meta_sha256`` too (a crafted file)."""
    import hashlib

    def edit(ms):
        meta = json.loads(_meta_text(ms))
        fn(meta)
        text = json.dumps(meta)
        ms["meta.npy"] = _npy(text)
        if rehash:
            ms["meta_sha256.npy"] = _npy(hashlib.sha256(text.encode()).hexdigest())

    return edit


def _recrafted(member, arr):
    """An edit that replaces ``member`` and updates its checksum and the meta's (a crafted file)."""
    import hashlib

    def edit(ms):
        ms[member + ".npy"] = _npy(arr)
        meta = json.loads(_meta_text(ms))
        meta["checksums"][member] = hashlib.sha256(ms[member + ".npy"]).hexdigest()
        text = json.dumps(meta)
        ms["meta.npy"] = _npy(text)
        ms["meta_sha256.npy"] = _npy(hashlib.sha256(text.encode()).hexdigest())

    return edit


def _build(root, inputs, **kw):
    from obcjax.allocation import build_database

    params, stats, levels = inputs
    return build_database(params, stats, levels, path=root, progress=False, **kw)


def _layer0(root):
    return str(root / "dense_0.npz")


_DB_CASES = [
    (
        "path-is-a-file",
        lambda r, i: (r.write_bytes(b"x"), _build(r, i)),
        NotADirectoryError,
        r"'.*db' is an existing file, not a folder",
    ),
    (
        "parent-is-a-file",
        lambda r, i: ((r.parent / "f").write_bytes(b"x"), _build(r.parent / "f" / "db", i)),
        NotADirectoryError,
        "cannot create the database folder",
    ),
    (
        "weights-byte-flipped",
        lambda r, i: (_flip_member(_layer0(r), "weights"), _build(r, i)),
        CorruptedFileError,
        r"layer 'dense_0'.*dense_0\.npz.*member 'weights'",
    ),
    (
        "weights-first-data-byte-flipped",
        lambda r, i: (_flip_member(_layer0(r), "weights", at=200), _build(r, i)),
        CorruptedFileError,
        r"'dense_0'.*member 'weights'",
    ),
    (
        "loss-byte-flipped",
        lambda r, i: (_flip_member(str(r / "dense_1.npz"), "loss"), _build(r, i)),
        CorruptedFileError,
        r"layer 'dense_1'.*dense_1\.npz.*member 'loss'",
    ),
    (
        "meta-byte-flipped",
        lambda r, i: (_flip_member(_layer0(r), "meta", at=-40), _build(r, i)),
        CorruptedFileError,
        r"'dense_0'.*dense_0\.npz.*'meta'",
    ),
    (
        "meta-edited-crc-ok",
        lambda r, i: (_rezip(_layer0(r), _meta_edit(lambda m: _set(m, "groups", 2))), _build(r, i)),
        CorruptedFileError,
        r"'dense_0'.*member 'meta' fails its checksum",
    ),
    (
        "weights-edited-crc-ok",
        lambda r, i: (
            _rezip(
                _layer0(r), lambda ms: _set(ms, "weights.npy", ms["weights.npy"][:-4] + b"\0" * 4)
            ),
            _build(r, i),
        ),
        CorruptedFileError,
        "member 'weights' fails its checksum",
    ),
    (
        "member-removed",
        lambda r, i: (_rezip(_layer0(r), lambda ms: ms.pop("nnz.npy")), _build(r, i)),
        CorruptedFileError,
        r"'dense_0'.*missing \['nnz'\]",
    ),
    (
        "member-added",
        lambda r, i: (_rezip(_layer0(r), lambda ms: _set(ms, "x.npy", _npy(1))), _build(r, i)),
        CorruptedFileError,
        r"not expected \['x'\]",
    ),
    (
        "member-not-npy",
        lambda r, i: (_rezip(_layer0(r), lambda ms: _set(ms, "x.txt", b"1")), _build(r, i)),
        CorruptedFileError,
        r"'dense_0'.*unexpected members",
    ),
    (
        "meta-missing",
        lambda r, i: (_rezip(_layer0(r), lambda ms: ms.pop("meta.npy")), _build(r, i)),
        CorruptedFileError,
        "member 'meta' is missing",
    ),
    (
        "truncated-file",
        lambda r, i: (
            open(_layer0(r), "r+b").truncate(os.path.getsize(_layer0(r)) // 2),
            _build(r, i),
        ),
        CorruptedFileError,
        r"'dense_0'.*dense_0\.npz.*not a readable \.npz",
    ),
    (
        "garbage-file",
        lambda r, i: (open(_layer0(r), "wb").write(b"garbage" * 10), _build(r, i)),
        CorruptedFileError,
        r"'dense_0'.*dense_0\.npz",
    ),
    (
        "layer-file-is-a-folder",
        lambda r, i: (os.remove(_layer0(r)), os.mkdir(_layer0(r)), _build(r, i)),
        CorruptedFileError,
        r"'dense_0'.*dense_0\.npz",
    ),
    (
        "weights-bad-dtype-crafted",
        lambda r, i: (
            _rezip(_layer0(r), _recrafted("weights", np.zeros((3, 16, 16), np.int8))),
            _build(r, i),
        ),
        CorruptedFileError,
        r"'dense_0'.*member 'weights' is int8",
    ),
    (
        "loss-bad-shape-crafted",
        lambda r, i: (_rezip(_layer0(r), _recrafted("loss", np.zeros(5))), _build(r, i)),
        CorruptedFileError,
        r"'dense_0'.*member 'loss' is float64 \(5,\)",
    ),
    (
        "nnz-bad-dtype-crafted",
        lambda r, i: (_rezip(_layer0(r), _recrafted("nnz", np.zeros(3, np.float32))), _build(r, i)),
        CorruptedFileError,
        r"'dense_0'.*member 'nnz'",
    ),
    (
        "checksums-table-missing",
        lambda r, i: (
            _rezip(_layer0(r), _meta_edit(lambda m: m.pop("checksums"), rehash=True)),
            _build(r, i),
        ),
        CorruptedFileError,
        r"'dense_0'.*no valid 'checksums' table",
    ),
    (
        "checksum-entry-edited",
        lambda r, i: (
            _rezip(_layer0(r), _meta_edit(lambda m: _set(m["checksums"], "nnz", "0"), True)),
            _build(r, i),
        ),
        CorruptedFileError,
        r"'dense_0'.*member 'nnz' fails its checksum",
    ),
    (
        "meta-field-invalid-crafted",
        lambda r, i: (
            _rezip(_layer0(r), _meta_edit(lambda m: _set(m, "shape", "16x16"), True)),
            _build(r, i),
        ),
        CorruptedFileError,
        r"'dense_0'.*dense_0\.npz.*invalid",
    ),
]


@pytest.mark.parametrize(
    "action, exc, pattern", [c[1:] for c in _DB_CASES], ids=[c[0] for c in _DB_CASES]
)
def test_database_bad_inputs(tmp_path, db_folder, action, exc, pattern):
    root = _db_copy(tmp_path, db_folder)
    if exc is NotADirectoryError:
        shutil.rmtree(root)
    with pytest.raises(exc) as info:
        action(root, db_folder[1])
    assert type(info.value) is exc
    assert re.search(pattern, str(info.value)), str(info.value)


def test_database_damaged_after_load_names_layer_and_file(tmp_path, db_folder):
    from obcjax.allocation import materialize

    root = _db_copy(tmp_path, db_folder)
    params, stats, levels = db_folder[1]
    db = _build(root, db_folder[1])
    assert db.loaded == ["dense_0", "dense_1"]
    _flip_member(_layer0(root), "weights")  # damaged after the load: the zip CRC still sees it
    with pytest.raises(CorruptedFileError, match=r"layer 'dense_0'.*dense_0\.npz"):
        db.weights("dense_0", "w4")
    with pytest.raises(CorruptedFileError, match=r"layer 'dense_0'.*dense_0\.npz"):
        materialize(params, db, {p: "w4" for p in db.paths})
    os.remove(_layer0(root))
    with pytest.raises(FileNotFoundError, match=r"layer 'dense_0'.*dense_0\.npz.*removed"):
        db.weights("dense_0", "w4")


def test_database_recompute_heals_a_damaged_member(tmp_path, db_folder):
    root = _db_copy(tmp_path, db_folder)
    _flip_member(_layer0(root), "weights")
    db = _build(root, db_folder[1], on_mismatch="recompute")
    assert db.computed == ["dense_0"] and db.loaded == ["dense_1"]
    again = _build(root, db_folder[1])  # the rewritten file verifies
    assert again.loaded == ["dense_0", "dense_1"]
    ref = db_folder[2]
    for lv in again.levels("dense_0"):
        np.testing.assert_array_equal(again.weights("dense_0", lv), ref.weights("dense_0", lv))
    assert _temps(root) == []


def test_database_member_write_failure_names_the_file(tmp_path, db_folder, monkeypatch):
    root = tmp_path / "db"
    with monkeypatch.context() as mp:

        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        mp.setattr(os, "fsync", full)
        with pytest.raises(OSError, match=r"database file '.*dense_0\.npz'.*No space") as info:
            _build(root, db_folder[1])
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(root) == []  # the temporary file is gone
