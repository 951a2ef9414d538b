"""Packed export: compressed layers saved and loaded at their true size.

A "4-bit, 50 % sparse" layer held as float32 arrays is as large as the dense one. This module
packs each layer into the few integer/float tensors that carry its information and writes them to
one file:

========================  ==================================================================
kind                      stored tensors
========================  ==================================================================
``dense``                 ``values``: the array as is (float32, or float16 if asked)
``quantized``             ``codes``: packed ``bits``-bit codes; ``scale``/``zero``: per channel,
                          per group, or one shared codebook ``(1, 1)`` (OPQ's "one grid per layer")
``sparse``                ``mask``: 1 bit per weight (True = kept); ``values``: kept weights
``sparse_quantized``      ``mask`` + packed codes of the kept weights + ``scale``/``zero``
``nm``                    ``indices``: for every group of ``m`` columns, the ``m - n`` kept
                          positions in ``ceil(log2 m)`` bits each (the 2:4 sparse-tensor-core
                          layout: 2 kept values + 2-bit indices per group of 4); ``values``:
                          ``(rows, cols·(m-n)/m)`` kept weights
``nm_quantized``          ``indices`` + packed codes of the kept weights + ``scale``/``zero``
========================  ==================================================================

Bit streams (codes, masks, N:M indices) are LSB-first: code ``i`` occupies bits
``[i·b, (i+1)·b)`` of the little-endian stream, so 8 codes of ``b`` bits fill exactly ``b`` bytes
(3-bit: 8 codes in 3 bytes); the tail is zero-padded to a whole byte. Codes of pruned weights are
not stored: they come back as the zero point (the code of 0.0), where the solvers put them.

Container: **safetensors**, one file. It is a flat, documented layout (an 8-byte header length, a
JSON header, then the raw tensor bytes back to back), so the file size is the packed size plus a
small header; loading runs no pickle (safe on untrusted files) and maps the file instead of
parsing it; the header's ``__metadata__`` holds our manifest as JSON; and any language with a
safetensors reader can open it. Orbax is built for sharded, asynchronous checkpoints of live
``jax.Array`` trees: a directory of files per checkpoint and a far heavier dependency, which buys
nothing for a few packed numpy tensors that must land atomically as one file.

The manifest (header key ``"obcjax.manifest"``) records the format name, ``FORMAT_VERSION``, the
obcjax version and, per layer: kind, shape, value dtype, bits, group size, granularity, N:M,
number of kept weights, theoretical bits, and per tensor its key, dtype, shape, byte count,
packing and SHA-256, plus a SHA-256 checksum over the layer's record. The header key
``"obcjax.digest"`` holds one SHA-256 digest over the canonical JSON (sorted keys) of the whole
manifest (layer records with their checksums, the params section with each leaf's layout, shape
and dtype) and of the user metadata. :func:`load` checks every one of them before it returns
anything, so a flipped bit anywhere in the header or the data is an error, never a different
model: it raises :class:`obcjax.fileio.CorruptedFileError` (a ``ValueError``) naming the file and
the field for a truncated or damaged file, and ``ValueError`` for a newer format version or a
file that is not ours; nothing is returned half-loaded.

Files are written with :func:`obcjax.fileio.atomic_write` (temporary file in the same folder,
fsync, ``os.replace``): a crash leaves the old file or the new one; a read-only target is refused
unless ``overwrite_readonly=True``; a directory, a missing folder or a full disk give one error
naming the path given.

Example:
    >>> import os, tempfile
    >>> import numpy as np
    >>> from obcjax import export
    >>> from obcjax.kernels import obq_prune_quantize
    >>> rng = np.random.default_rng(0)
    >>> W = rng.normal(size=(64, 128)).astype(np.float32)
    >>> X = rng.normal(size=(128, 512)).astype(np.float32)
    >>> res = obq_prune_quantize(W, 2 * X @ X.T / 512, "2:4", 4)    # 2:4 sparse on a 4-bit grid
    >>> layer = export.pack_layer(res.weights, mask=res.mask, qarray=res.qarray, nm=(2, 4))
    >>> path = os.path.join(tempfile.mkdtemp(), "model.obc.safetensors")
    >>> export.save(path, {"dense1": layer}, metadata={"spec": "2:4+w4"})
    >>> layers, meta = export.load(path)
    >>> W2, mask, qarray = export.unpack_layer(layers["dense1"])
    >>> bool(np.array_equal(W2, res.weights)), meta
    (True, {'spec': '2:4+w4'})

Whole Flax models: ``save_params(path, params, packed)`` stores the packed kernels and every other
leaf as is; ``load_params(path)`` gives back nested dicts with every leaf in its original dtype
(bfloat16 and float16 included), bit for bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from obcjax.fileio import CorruptedFileError, atomic_write, check_readable, check_writable
from obcjax.layout import Layout, from_matrices, to_matrices
from obcjax.quant import QArray
from obcjax.specs import NM

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KINDS",
    "PackedLayer",
    "pack_bits",
    "unpack_bits",
    "pack_layer",
    "unpack_layer",
    "theoretical_bits",
    "nbytes",
    "save",
    "load",
    "save_params",
    "load_params",
    "pack_compressed",
    "CorruptedFileError",
]

FORMAT_NAME = "obcjax-packed"
# 2: per-tensor SHA-256 and one digest over the manifest and metadata (version 1 files still load)
FORMAT_VERSION = 2
KINDS = ("dense", "quantized", "sparse", "sparse_quantized", "nm", "nm_quantized")

_MANIFEST_KEY = "obcjax.manifest"
_METADATA_KEY = "obcjax.metadata"
_DIGEST_KEY = "obcjax.digest"
_LAYOUTS = ("kernel", "identity")
_QUANT_KINDS = ("quantized", "sparse_quantized", "nm_quantized")
# 1 Mi groups of 8 codes per chunk keeps the uint64 scratch of pack/unpack at 8 MiB per 1 Mi codes
_CHUNK_GROUPS = 1 << 20


# ----------------------------------------------------------------------------------------------
# Bit packing
# ----------------------------------------------------------------------------------------------


def _check_bits(bits, what="bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"{what} must be an int in 1..8, got {bits!r}")
    return int(bits)


def pack_bits(codes, bits: int) -> np.ndarray:
    """Pack integer codes densely into bytes, ``bits`` bits per code, LSB first.

    Args:
      codes: integer (or bool) array of any shape with values in ``[0, 2**bits)``; it is read in
        row-major order.
      bits: 1..8.

    Returns:
      ``(ceil(n·bits/8),)`` uint8 array, ``n = codes.size``: code ``i`` sits in bits
      ``[i·bits, (i+1)·bits)`` of the little-endian stream; the tail byte is zero-padded.

    Example:
      >>> pack_bits(np.array([1, 2, 3, 4, 5, 6, 7, 0]), 3)   # 8 codes, 3 bytes
      array([209, 88, 31], dtype=uint8)
    """
    bits = _check_bits(bits)
    c = np.asarray(codes)
    if c.dtype == np.bool_:
        c = c.astype(np.uint8)
    if not np.issubdtype(c.dtype, np.integer):
        raise TypeError(f"pack_bits: codes must be an integer array, got dtype {c.dtype}")
    flat = c.reshape(-1)
    n = flat.size
    if n and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(
            f"pack_bits: codes must lie in [0, {1 << bits}) for {bits} bits, got values in "
            f"[{int(flat.min())}, {int(flat.max())}]"
        )
    if bits == 8:
        return flat.astype(np.uint8)
    if bits == 1:
        return np.packbits(flat.astype(np.uint8), bitorder="little")
    # General b: 8 codes make one 8b-bit word; its first b little-endian bytes are the packing.
    out_len = (n * bits + 7) // 8
    groups = -(-n // 8)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    out = np.empty(groups * bits, np.uint8)
    for g0 in range(0, groups, _CHUNK_GROUPS):
        g1 = min(groups, g0 + _CHUNK_GROUPS)
        chunk = np.zeros((g1 - g0) * 8, np.uint64)
        src = flat[g0 * 8 : g1 * 8]
        chunk[: src.size] = src
        words = np.bitwise_or.reduce(chunk.reshape(-1, 8) << shifts, axis=1).astype("<u8")
        out[g0 * bits : g1 * bits] = words.view(np.uint8).reshape(-1, 8)[:, :bits].reshape(-1)
    return out[:out_len]


def unpack_bits(packed, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``n`` codes of a packed stream.

    Args:
      packed: ``(ceil(n·bits/8),)`` uint8 array from :func:`pack_bits`.
      bits: 1..8. n: number of codes.

    Returns:
      ``(n,)`` uint8 codes.

    Raises:
      ValueError: if ``packed`` has the wrong length or nonzero padding bits (a stream that
        :func:`pack_bits` cannot have written).
    """
    bits = _check_bits(bits)
    p = np.asarray(packed)
    if p.dtype != np.uint8 or p.ndim != 1:
        raise ValueError(
            f"unpack_bits: packed must be a 1-D uint8 array, got {p.dtype} {tuple(p.shape)}"
        )
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"unpack_bits: n must be a non-negative int, got {n!r}")
    n = int(n)
    need = (n * bits + 7) // 8
    if p.size != need:
        raise ValueError(f"unpack_bits: {n} codes of {bits} bits need {need} bytes, got {p.size}")
    tail = (n * bits) % 8
    if tail and int(p[-1]) >> tail:
        raise ValueError("unpack_bits: nonzero padding bits after the last code (corrupted stream)")
    if bits == 8:
        return p.copy()
    if bits == 1:
        return np.unpackbits(p, count=n, bitorder="little")
    groups = -(-n // 8)
    padded = np.zeros(groups * bits, np.uint8)
    padded[: p.size] = p
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    mask = np.uint64((1 << bits) - 1)
    out = np.empty(groups * 8, np.uint8)
    for g0 in range(0, groups, _CHUNK_GROUPS):
        g1 = min(groups, g0 + _CHUNK_GROUPS)
        buf = np.zeros((g1 - g0, 8), np.uint8)
        buf[:, :bits] = padded[g0 * bits : g1 * bits].reshape(-1, bits)
        words = buf.view("<u8").reshape(-1, 1)
        out[g0 * 8 : g1 * 8] = ((words >> shifts) & mask).astype(np.uint8).reshape(-1)
    return out[:n]


# ----------------------------------------------------------------------------------------------
# Packed layers
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class PackedLayer:
    """One layer in packed form (see the module docstring for the kinds and their tensors).

    Attributes:
      kind: one of :data:`KINDS`.
      shape: the layer's dense shape; ``(rows, cols)`` for every kind but ``dense`` and ``sparse``.
      tensors: ``{part: numpy array}``; parts ``values``, ``codes``, ``mask``, ``indices``,
        ``scale``, ``zero`` as the kind needs.
      dtype: dtype name of the stored float ``values`` (None for quantized kinds).
      bits: code width of quantized kinds. group_size: columns per ``scale`` group (``cols`` for
        one group per row), as ``QArray.group_size``.
      granularity: ``"channel"``, ``"group"`` or ``"tensor"`` (one shared ``(1, 1)`` grid).
      nm: ``(n, m)``: ``n`` zeros in every ``m`` consecutive columns (as :class:`obcjax.specs.NM`).
      nnz: number of stored (kept) weights.
      zero_dtype: dtype name of ``QArray.zero`` to restore (the zero point is stored as uint8 when
        it is an integer in 0..255).
    """

    kind: str
    shape: tuple[int, ...]
    tensors: Mapping[str, np.ndarray]
    dtype: str | None = None
    bits: int | None = None
    group_size: int | None = None
    granularity: str | None = None
    nm: tuple[int, int] | None = None
    nnz: int = 0
    zero_dtype: str | None = None

    def __repr__(self) -> str:
        extra = [
            f"{k}={v!r}"
            for k in ("dtype", "bits", "group_size", "granularity", "nm")
            if (v := getattr(self, k)) is not None
        ]
        return (
            f"PackedLayer(kind={self.kind!r}, shape={self.shape}, {', '.join(extra)}, "
            f"nnz={self.nnz}, nbytes={nbytes(self)})"
        )

    @property
    def spec(self) -> dict[str, Any]:
        """The layer's description as recorded in the manifest (no tensors)."""
        return {
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "bits": self.bits,
            "group_size": self.group_size,
            "granularity": self.granularity,
            "nm": list(self.nm) if self.nm is not None else None,
            "nnz": self.nnz,
            "zero_dtype": self.zero_dtype,
        }


def _index_bits(m: int) -> int:
    return max(1, (m - 1).bit_length())


def _as_nm(nm, name: str) -> tuple[int, int]:
    if isinstance(nm, NM):
        return nm.n, nm.m
    try:
        n, m = nm
        n, m = int(n), int(m)
    except (TypeError, ValueError):
        raise TypeError(
            f"layer {name!r}: nm must be an obcjax.specs.NM or an (n, m) pair, got {nm!r}"
        ) from None
    if m < 2 or not 0 < n < m or _index_bits(m) > 8:
        raise ValueError(
            f"layer {name!r}: N:M needs 0 < n < m and 2 <= m <= 256 (n zeros in every m), "
            f"got n={n}, m={m}"
        )
    return n, m


def _float_dtype(dtype, name: str, fallback: np.dtype) -> np.dtype:
    if dtype is None:
        return fallback
    if dtype not in ("float32", "float16", np.float32, np.float16):
        raise ValueError(
            f"layer {name!r}: dtype must be 'float32', 'float16' or None (keep as is), got {dtype!r}"
        )
    return np.dtype(dtype)


def _np_dtype(name, what: str) -> np.dtype:
    """The numpy dtype named ``name`` (bfloat16 & co. through ml_dtypes); numeric kinds only."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 and the float8 types with numpy)

    if not isinstance(name, str):
        raise TypeError(f"{what}: dtype must be a dtype name, got {name!r}")
    try:
        dt = np.dtype(name)
    except TypeError:
        raise ValueError(f"{what}: unknown dtype {name!r}") from None
    if dt.kind not in "biufc" and not dt.type.__module__.startswith("ml_dtypes"):
        raise ValueError(f"{what}: dtype {name!r} is not numeric")
    return dt


def _grid_shape(layer: PackedLayer) -> tuple[int, int]:
    rows, cols = layer.shape
    if layer.granularity == "tensor":
        return (1, 1)
    return (rows, cols // layer.group_size)


def _expected_tensors(layer: PackedLayer, name: str) -> dict[str, tuple[str | None, tuple]]:
    """``{part: (dtype name or None for 'any float', shape)}`` that ``layer`` must hold."""
    kind = layer.kind
    if kind not in KINDS:
        raise ValueError(f"layer {name!r}: unknown kind {kind!r}; expected one of {KINDS}")
    shape = tuple(int(s) for s in layer.shape)
    size = math.prod(shape)
    exp: dict[str, tuple[str | None, tuple]] = {}
    if kind == "dense":
        exp["values"] = (layer.dtype, shape)
        return exp
    if kind != "sparse" and len(shape) != 2:
        raise ValueError(f"layer {name!r}: kind {kind!r} needs a 2-D shape, got {shape}")
    if kind in ("sparse", "sparse_quantized"):
        exp["mask"] = ("uint8", ((size + 7) // 8,))
        if not 0 <= layer.nnz <= size:
            raise ValueError(f"layer {name!r}: nnz={layer.nnz} outside [0, {size}]")
        if kind == "sparse":
            exp["values"] = (layer.dtype, (layer.nnz,))
    if kind in ("nm", "nm_quantized"):
        if layer.nm is None:
            raise ValueError(f"layer {name!r}: kind {kind!r} needs nm=(n, m)")
        n, m = _as_nm(layer.nm, name)
        rows, cols = shape
        if cols % m:
            raise ValueError(f"layer {name!r}: N:M {n}:{m} needs cols divisible by {m}, got {cols}")
        kept = rows * (cols // m) * (m - n)
        if layer.nnz != kept:
            raise ValueError(
                f"layer {name!r}: N:M {n}:{m} of shape {shape} keeps {kept} weights, "
                f"but nnz={layer.nnz}"
            )
        exp["indices"] = ("uint8", ((kept * _index_bits(m) + 7) // 8,))
        if kind == "nm":
            exp["values"] = (layer.dtype, (rows, (cols // m) * (m - n)))
    if kind in _QUANT_KINDS:
        bits = _check_bits(layer.bits, f"layer {name!r}: bits")
        rows, cols = shape
        gs = layer.group_size
        if not isinstance(gs, int) or gs < 1 or cols % gs:
            raise ValueError(
                f"layer {name!r}: group_size must be a positive divisor of cols={cols}, got {gs!r}"
            )
        if layer.granularity not in ("channel", "group", "tensor"):
            raise ValueError(
                f"layer {name!r}: granularity must be 'channel', 'group' or 'tensor', "
                f"got {layer.granularity!r}"
            )
        ncodes = size if kind == "quantized" else layer.nnz
        exp["codes"] = ("uint8", ((ncodes * bits + 7) // 8,))
        exp["scale"] = (None, _grid_shape(layer))
        exp["zero"] = (None, _grid_shape(layer))
    return exp


def _check_layer(layer: PackedLayer, name: str) -> None:
    """Raise ValueError naming ``name`` if the tensors do not match the layer's description."""
    if not isinstance(layer, PackedLayer):
        raise TypeError(f"layer {name!r}: expected a PackedLayer, got {type(layer).__name__}")
    exp = _expected_tensors(layer, name)
    have = set(layer.tensors)
    if have != set(exp):
        raise ValueError(
            f"layer {name!r}: kind {layer.kind!r} holds tensors {sorted(exp)}, got {sorted(have)}"
        )
    for part, (dtype, shape) in exp.items():
        t = layer.tensors[part]
        if not isinstance(t, np.ndarray):
            raise TypeError(f"layer {name!r}: tensor {part!r} must be a numpy array")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"layer {name!r}: tensor {part!r} has shape {tuple(t.shape)}, expected {shape} "
                f"for kind {layer.kind!r} of shape {tuple(layer.shape)}"
            )
        if dtype is not None and t.dtype.name != dtype:
            raise ValueError(
                f"layer {name!r}: tensor {part!r} has dtype {t.dtype.name}, expected {dtype}"
            )
        if part == "scale" and t.dtype.kind != "f":
            raise ValueError(f"layer {name!r}: scale must be float, got {t.dtype.name}")
        if part == "zero" and t.dtype.name != "uint8" and t.dtype.kind != "f":
            raise ValueError(f"layer {name!r}: zero must be uint8 or float, got {t.dtype.name}")


def _pack_grid(q: QArray, rows: int, cols: int, name: str):
    codes = np.asarray(q.codes)
    scale = np.asarray(q.scale)
    zero = np.asarray(q.zero)
    bits = _check_bits(q.bits, f"layer {name!r}: qarray.bits")
    gs = int(q.group_size)
    if codes.shape != (rows, cols):
        raise ValueError(
            f"layer {name!r}: qarray.codes has shape {codes.shape}, expected the weights' "
            f"{(rows, cols)}"
        )
    if not np.issubdtype(codes.dtype, np.integer):
        raise TypeError(f"layer {name!r}: qarray.codes must be integers, got {codes.dtype}")
    if gs < 1 or cols % gs:
        raise ValueError(
            f"layer {name!r}: qarray.group_size={gs} must be a positive divisor of cols={cols}"
        )
    gshape = (rows, cols // gs)
    if scale.shape != gshape or zero.shape != gshape:
        raise ValueError(
            f"layer {name!r}: qarray.scale/zero have shapes {scale.shape}/{zero.shape}, expected "
            f"{gshape} (rows, cols // group_size)"
        )
    if scale.dtype.kind != "f" or zero.dtype.kind not in "fiu":
        raise TypeError(
            f"layer {name!r}: qarray.scale must be float and zero numeric, got "
            f"{scale.dtype}/{zero.dtype}"
        )
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"layer {name!r}: qarray.codes outside [0, {1 << bits}) for {bits} bits")
    s = np.ascontiguousarray(scale)
    z = np.ascontiguousarray(zero)
    sv, zv = s.view(f"u{s.itemsize}"), z.view(f"u{z.itemsize}")
    shared = sv.size > 1 and bool(np.all(sv == sv.flat[0]) and np.all(zv == zv.flat[0]))
    if shared:
        granularity = "tensor"
        s, z = s[:1, :1].copy(), z[:1, :1].copy()
    else:
        granularity = "channel" if gs == cols else "group"
    zf = z.astype(np.float64)
    if np.all((zf == np.round(zf)) & (zf >= 0) & (zf <= 255)):
        zstore = z.astype(np.uint8)
    else:
        zstore = z.copy()
    meta = dict(bits=bits, group_size=gs, granularity=granularity, zero_dtype=zero.dtype.name)
    return codes.astype(np.uint8), s, zstore, meta


def _expand_grid(layer: PackedLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(scale, zero)`` as ``(rows, ngroups)`` QArray fields and ``(rows, cols)`` per column."""
    rows, cols = layer.shape
    ng = cols // layer.group_size
    scale = np.broadcast_to(layer.tensors["scale"], (rows, ng)).copy()
    zero = np.broadcast_to(layer.tensors["zero"], (rows, ng)).astype(layer.zero_dtype)
    return (
        scale,
        zero,
        np.repeat(scale, layer.group_size, axis=1),
        np.repeat(zero, layer.group_size, axis=1),
    )


def _nm_positions(mask: np.ndarray, n: int, m: int, name: str) -> np.ndarray:
    """Sorted kept positions ``(rows, cols/m, m-n)`` of an N:M mask (exactly m-n kept per group)."""
    rows, cols = mask.shape
    groups = mask.reshape(rows, cols // m, m)
    counts = groups.sum(axis=-1)
    k = m - n
    bad = np.argwhere(counts != k)
    if bad.size:
        r, g = bad[0]
        raise ValueError(
            f"layer {name!r}: N:M {n}:{m} keeps exactly {k} of every {m} weights, but row {r} "
            f"columns {g * m}..{g * m + m - 1} keep {counts[r, g]} ({len(bad)} such group(s))"
        )
    key = np.where(groups, 0, m) + np.arange(m)
    return np.sort(np.argsort(key, axis=-1, kind="stable")[..., :k], axis=-1)


def pack_layer(
    weights,
    *,
    mask=None,
    qarray: QArray | None = None,
    nm=None,
    dtype: str | None = "float32",
    name: str = "<layer>",
) -> PackedLayer:
    """Pack one layer, choosing the kind from what is given.

    ``nm`` → ``nm`` / ``nm_quantized``; else ``mask`` → ``sparse`` / ``sparse_quantized``; else
    ``qarray`` → ``quantized``; else ``dense``.

    Args:
      weights: the layer's weights, ``(rows, cols)`` (any shape for dense and unstructured
        sparse). With a ``qarray`` it may be None (the dequantized codes are the weights);
        otherwise it must agree with the dequantized codes to a quarter of a grid step, and be
        exactly 0 where ``mask`` is False.
      mask: bool, same shape, True where a weight is kept (``Result.mask``).
      qarray: :class:`obcjax.quant.QArray` of the weights (``Result.qarray``).
      nm: ``(n, m)`` or :class:`obcjax.specs.NM`: ``n`` zeros in every ``m`` consecutive
        columns. Without ``mask``, the kept positions are the nonzero weights (a group with fewer
        nonzeros keeps its first zeros too).
      dtype: ``"float32"``, ``"float16"`` or None (keep the input's dtype) for stored float values.
        Scales always keep their own dtype.
      name: layer name used in error messages.

    Returns:
      A :class:`PackedLayer`.

    Example:
      >>> from obcjax.kernels import obq_prune_quantize
      >>> rng = np.random.default_rng(0)
      >>> W = rng.normal(size=(64, 128)).astype(np.float32)
      >>> X = rng.normal(size=(128, 512)).astype(np.float32)
      >>> res = obq_prune_quantize(W, 2 * X @ X.T / 512, NM(2, 4), 4)
      >>> p = pack_layer(res.weights, mask=res.mask, qarray=res.qarray, nm=NM(2, 4))
      >>> p.kind   # (64, 128) at 4 bits: 2 KiB codes + 1 KiB indices + 64 scales/zeros
      'nm_quantized'
    """
    W = None if weights is None else np.asarray(weights)
    if W is None and qarray is None:
        raise ValueError(f"layer {name!r}: weights may only be None when a qarray is given")
    if W is not None and W.dtype.kind not in "fiub" and W.dtype.name != "bfloat16":
        raise TypeError(f"layer {name!r}: weights must be numeric, got dtype {W.dtype}")
    if mask is None and qarray is None and nm is None:
        vdt = _float_dtype(dtype, name, W.dtype)
        return PackedLayer(
            "dense", W.shape, {"values": np.array(W, dtype=vdt, order="C")}, vdt.name, nnz=W.size
        )

    if qarray is not None and not all(
        hasattr(qarray, f) for f in ("codes", "scale", "zero", "bits", "group_size")
    ):
        raise TypeError(
            f"layer {name!r}: qarray must be an obcjax.quant.QArray (codes, scale, zero, bits, "
            f"group_size), got {type(qarray).__name__}"
        )
    if qarray is not None:
        q_codes = np.asarray(qarray.codes)
        if q_codes.ndim != 2:
            raise ValueError(f"layer {name!r}: qarray.codes must be 2-D, got {q_codes.shape}")
        rows, cols = q_codes.shape
        codes, s, z, qmeta = _pack_grid(qarray, rows, cols, name)
        # Dequantize in the scale dtype the way obcjax.quant.dequantize does.
        zf = np.asarray(qarray.zero)
        se = np.repeat(np.asarray(qarray.scale), qmeta["group_size"], axis=1)
        ze = np.repeat(zf, qmeta["group_size"], axis=1)
        deq = se * (codes.astype(se.dtype) - ze)
        if W is None:
            W = deq if mask is None else np.where(np.asarray(mask, bool), deq, 0).astype(se.dtype)
        elif W.shape != (rows, cols):
            raise ValueError(
                f"layer {name!r}: weights of shape {W.shape} but qarray codes of {(rows, cols)}"
            )
    else:
        qmeta = None
    if W.ndim != 2 and (nm is not None or qarray is not None):
        raise ValueError(
            f"layer {name!r}: N:M and quantized layers need 2-D weights, got {W.shape}"
        )

    if mask is not None:
        M = np.asarray(mask)
        if M.shape != W.shape:
            raise ValueError(f"layer {name!r}: mask shape {M.shape} != weights shape {W.shape}")
        if M.dtype != np.bool_:
            if M.dtype.kind not in "iuf" or not np.all((M == 0) | (M == 1)):
                raise TypeError(f"layer {name!r}: mask must be boolean (True = kept)")
            M = M.astype(bool)
        pruned_nonzero = int(np.count_nonzero(W[~M]))
        if pruned_nonzero:
            raise ValueError(
                f"layer {name!r}: {pruned_nonzero} weight(s) are nonzero where mask is False; a "
                f"pruned weight must be exactly 0 (mask True = kept)"
            )
    else:
        M = None

    if qarray is not None:
        keep = np.ones(W.shape, bool) if M is None else M
        off = np.abs(W.astype(np.float64) - deq) > 0.25 * np.abs(se.astype(np.float64))
        nbad = int(np.count_nonzero(off & keep))
        if nbad:
            raise ValueError(
                f"layer {name!r}: {nbad} weight(s) differ from the dequantized qarray by more than "
                f"a quarter grid step; pass the weights the qarray was made from"
            )

    floating = W.dtype.kind == "f" or W.dtype.name == "bfloat16"
    vdt = _float_dtype(dtype, name, W.dtype if floating else np.dtype(np.float32))
    common = dict(qmeta) if qmeta is not None else {}

    if nm is not None:
        n, m = _as_nm(nm, name)
        rows, cols = W.shape
        if cols % m:
            raise ValueError(
                f"layer {name!r}: N:M {n}:{m} needs the width to be a multiple of {m}, "
                f"got {cols} columns"
            )
        if M is None:
            nz = (W != 0).reshape(rows, cols // m, m)
            over = nz.sum(-1) > m - n
            if np.any(over):
                r, g = np.argwhere(over)[0]
                raise ValueError(
                    f"layer {name!r}: N:M {n}:{m} keeps at most {m - n} of every {m} weights, but "
                    f"row {r} columns {g * m}..{g * m + m - 1} hold {nz[r, g].sum()} nonzeros"
                )
            key = np.where(nz, 0, m) + np.arange(m)
            pos = np.sort(np.argsort(key, axis=-1, kind="stable")[..., : m - n], axis=-1)
        else:
            pos = _nm_positions(M, n, m, name)
        kept = rows * (cols // m) * (m - n)
        tensors = {"indices": pack_bits(pos, _index_bits(m))}
        if qarray is None:
            vals = np.take_along_axis(W.reshape(rows, cols // m, m), pos, axis=-1)
            tensors["values"] = np.ascontiguousarray(vals.reshape(rows, -1), dtype=vdt)
            return PackedLayer("nm", W.shape, tensors, vdt.name, nm=(n, m), nnz=kept)
        kc = np.take_along_axis(codes.reshape(rows, cols // m, m), pos, axis=-1)
        tensors.update(codes=pack_bits(kc, common["bits"]), scale=s, zero=z)
        return PackedLayer("nm_quantized", W.shape, tensors, nm=(n, m), nnz=kept, **common)

    if M is not None:
        tensors = {"mask": pack_bits(M, 1)}
        nnz = int(np.count_nonzero(M))
        if qarray is None:
            tensors["values"] = np.ascontiguousarray(W[M], dtype=vdt)
            return PackedLayer("sparse", W.shape, tensors, vdt.name, nnz=nnz)
        tensors.update(codes=pack_bits(codes[M], common["bits"]), scale=s, zero=z)
        return PackedLayer("sparse_quantized", W.shape, tensors, nnz=nnz, **common)

    tensors = {"codes": pack_bits(codes, common["bits"]), "scale": s, "zero": z}
    return PackedLayer("quantized", W.shape, tensors, nnz=W.size, **common)


def unpack_layer(layer: PackedLayer, *, name: str = "<layer>"):
    """Dense weights, mask and QArray of a packed layer.

    Args:
      layer: a :class:`PackedLayer`. name: layer name used in error messages.

    Returns:
      ``(weights, mask, qarray)``: ``weights`` float32 numpy of ``layer.shape`` (pruned entries
      0, quantized entries ``scale·(code - zero)``); ``mask`` bool (True = kept) for sparse and
      N:M kinds, else None; ``qarray`` a :class:`obcjax.quant.QArray` of numpy arrays for
      quantized kinds (pruned codes = the zero point), else None.

    Raises:
      ValueError: if the tensors are inconsistent (wrong sizes, a mask whose popcount is not
        ``nnz``, N:M indices not strictly increasing within a group).
    """
    _check_layer(layer, name)
    kind, shape, t = layer.kind, tuple(layer.shape), layer.tensors
    if kind == "dense":
        return t["values"].astype(np.float32), None, None
    size = math.prod(shape)
    M = None
    pos = None
    if kind in ("sparse", "sparse_quantized"):
        M = unpack_bits(t["mask"], 1, size).astype(bool).reshape(shape)
        if int(np.count_nonzero(M)) != layer.nnz:
            raise ValueError(
                f"layer {name!r}: the mask keeps {int(np.count_nonzero(M))} weights but the layer "
                f"stores {layer.nnz}"
            )
    if kind in ("nm", "nm_quantized"):
        n, m = layer.nm
        rows, cols = shape
        k = m - n
        pos = unpack_bits(t["indices"], _index_bits(m), layer.nnz).reshape(rows, cols // m, k)
        if np.any(pos >= m) or (k > 1 and np.any(np.diff(pos.astype(np.int16), axis=-1) <= 0)):
            raise ValueError(
                f"layer {name!r}: N:M indices must be strictly increasing positions in [0, {m}) "
                f"within each group"
            )
        G = np.zeros((rows, cols // m, m), bool)
        np.put_along_axis(G, pos.astype(np.intp), True, axis=-1)
        M = G.reshape(shape)

    if kind == "sparse":
        W = np.zeros(shape, np.float32)
        W[M] = t["values"].astype(np.float32)
        return W, M, None
    if kind == "nm":
        rows, cols = shape
        n, m = layer.nm
        G = np.zeros((rows, cols // m, m), np.float32)
        vals = t["values"].astype(np.float32).reshape(rows, cols // m, m - n)
        np.put_along_axis(G, pos.astype(np.intp), vals, axis=-1)
        return G.reshape(shape), M, None

    scale, zero, se, ze = _expand_grid(layer)
    stream = unpack_bits(t["codes"], layer.bits, size if kind == "quantized" else layer.nnz)
    if kind == "quantized":
        codes = stream.reshape(shape)
    else:
        zero_code = np.clip(np.round(ze.astype(np.float64)), 0, (1 << layer.bits) - 1)
        codes = zero_code.astype(np.uint8)
        codes[M] = stream
    deq = se * (codes.astype(se.dtype) - ze)
    W = deq.astype(np.float32)
    if M is not None:
        W = np.where(M, W, np.float32(0))
    return W, M, QArray(codes, scale, zero, int(layer.bits), int(layer.group_size))


_STREAM_PARTS = ("codes", "mask", "indices")


def _stream_len(layer: PackedLayer, part: str) -> tuple[int, int]:
    """``(number of entries, bits per entry)`` of a packed bit stream."""
    size = math.prod(layer.shape)
    if part == "mask":
        return size, 1
    if part == "indices":
        return layer.nnz, _index_bits(layer.nm[1])
    return (size if layer.kind == "quantized" else layer.nnz), layer.bits


def theoretical_bits(layer: PackedLayer) -> int:
    """Bits the layer's information takes without byte padding or file overhead.

    Bit streams count ``entries × bits`` (codes at their width, the mask at 1 bit per weight,
    N:M indices at ``ceil(log2 m)`` bits); every other tensor its full ``size × itemsize × 8``.
    """
    total = 0
    for part, t in layer.tensors.items():
        if part in _STREAM_PARTS:
            n, b = _stream_len(layer, part)
            total += n * b
        else:
            total += t.size * t.dtype.itemsize * 8
    return total


def nbytes(layer: PackedLayer) -> int:
    """Bytes of the layer's stored tensors (the file adds only the header)."""
    return int(sum(t.nbytes for t in layer.tensors.values()))


# ----------------------------------------------------------------------------------------------
# File format
# ----------------------------------------------------------------------------------------------


_PACKING = {
    "codes": "bitstream, LSB first, {bits} bits per code, row-major{kept}",
    "mask": "bitmask, LSB first, 1 bit per weight (1 = kept), row-major",
    "indices": "bitstream, LSB first, {ibits} bits per kept position, ascending within each "
    "group of {m} columns, row-major",
    "values": "{what} {dtype}",
    "scale": "{grid}",
    "zero": "{grid}, {zdtype}",
}


def _packing(layer: PackedLayer, part: str) -> str:
    grid = {
        "tensor": "one shared (1, 1) grid",
        "channel": "(rows, 1) one grid per row",
        "group": f"(rows, cols/{layer.group_size}) one grid per group of {layer.group_size}",
    }.get(layer.granularity, "")
    what = {"dense": "raw", "sparse": "kept values, row-major", "nm": "kept values (rows, k)"}
    return _PACKING[part].format(
        bits=layer.bits,
        kept="" if layer.kind == "quantized" else ", kept weights only",
        ibits=_index_bits(layer.nm[1]) if layer.nm else 0,
        m=layer.nm[1] if layer.nm else 0,
        what=what.get(layer.kind, ""),
        dtype=layer.dtype,
        grid=grid,
        zdtype=str(layer.tensors["zero"].dtype) if "zero" in layer.tensors else "",
    )


def _canonical(obj) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _tensor_sha(t: np.ndarray) -> str:
    t = np.require(t, requirements="C")
    return hashlib.sha256(t.reshape(-1).view(np.uint8)).hexdigest()


def _checksum(record: Mapping[str, Any], tensors: Mapping[str, np.ndarray] | None = None) -> str:
    """SHA-256 of a layer's record without its ``checksum`` (plus its tensors in version 1 files).

    From format version 2 every tensor record holds the SHA-256 of its bytes, so the record's
    checksum covers the tensors without hashing them twice.
    """
    h = hashlib.sha256()
    rec = {k: v for k, v in record.items() if k != "checksum"}
    h.update(json.dumps(rec, sort_keys=True, separators=(",", ":")).encode())
    for part in sorted(tensors or {}):
        t = np.require(tensors[part], requirements="C")
        h.update(f"{part}|{t.dtype.name}|{t.shape}|".encode())
        h.update(t.reshape(-1).view(np.uint8))
    return "sha256:" + h.hexdigest()


def _digest(manifest, metadata) -> str:
    """The file's digest: SHA-256 of the canonical manifest and user metadata (None if absent)."""
    body = _canonical({"manifest": manifest, "metadata": metadata})
    return "sha256:" + hashlib.sha256(b"obcjax-packed digest\n" + body).hexdigest()


def _record(layer: PackedLayer, name: str) -> dict[str, Any]:
    rec = dict(layer.spec)
    rec["theoretical_bits"] = theoretical_bits(layer)
    rec["nbytes"] = nbytes(layer)
    rec["tensors"] = {
        part: {
            "key": f"{name}:{part}",
            "dtype": t.dtype.name,
            "shape": list(t.shape),
            "nbytes": int(t.nbytes),
            "packing": _packing(layer, part),
            "sha256": _tensor_sha(t),
        }
        for part, t in sorted(layer.tensors.items())
    }
    rec["checksum"] = _checksum(rec)
    return rec


def _check_name(name, what="layer name") -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{what} must be a non-empty str, got {name!r}")
    return name


def _atomic_write(path, data: bytes, *, overwrite_readonly: bool = False) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, whole."""
    atomic_write(path, data, overwrite_readonly=overwrite_readonly, what="packed file")


def _write(
    path,
    layers: Mapping[str, PackedLayer],
    metadata,
    params_section,
    *,
    overwrite_readonly: bool = False,
) -> None:
    import safetensors.numpy as stn

    from obcjax import __version__

    # refuse a directory, a missing folder or a read-only file before any packing work
    check_writable(path, overwrite_readonly=overwrite_readonly, what="packed file")
    meta_json = None
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        try:
            meta_json = json.dumps(dict(metadata))
        except (TypeError, ValueError) as e:
            raise TypeError(f"metadata must be JSON-serialisable: {e}") from None
    records = {}
    tensors = {}
    for name, layer in layers.items():
        _check_layer(layer, name)
        rec = _record(layer, name)
        records[name] = rec
        for part, t in layer.tensors.items():
            tensors[rec["tensors"][part]["key"]] = np.require(t, requirements="C")
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "obcjax_version": __version__,
        "layers": records,
        "params": params_section,
    }
    manifest_json = json.dumps(manifest)
    header = {_MANIFEST_KEY: manifest_json}
    if meta_json is not None:
        header[_METADATA_KEY] = meta_json
    # the digest covers what a reader parses back, so it is computed from the JSON text
    header[_DIGEST_KEY] = _digest(
        json.loads(manifest_json), None if meta_json is None else json.loads(meta_json)
    )
    _atomic_write(path, stn.save(tensors, metadata=header), overwrite_readonly=overwrite_readonly)


def save(
    path,
    layers: Mapping[str, PackedLayer | Any],
    *,
    metadata: dict | None = None,
    overwrite_readonly: bool = False,
) -> None:
    """Write packed layers to one safetensors file, atomically.

    Args:
      path: destination file (replaced atomically if it exists; its folder must exist).
      layers: ``{name: PackedLayer or array}``; arrays are stored as dense layers as they are.
      metadata: optional JSON-serialisable dict stored in the header and returned by :func:`load`.
      overwrite_readonly: replace a read-only (no write bit) file; refused by default.

    Raises:
      IsADirectoryError, FileNotFoundError, PermissionError, OSError: ``path`` is a directory,
        its folder is missing, it is read-only, or the write failed (e.g. a full disk); the
        message names ``path`` and the old file is left as it was.

    Example:
      >>> import os, tempfile
      >>> from obcjax.kernels import rtn_quantize
      >>> W, b = np.linspace(-1, 1, 32, dtype=np.float32).reshape(4, 8), np.zeros(4, np.float32)
      >>> q = rtn_quantize(W, 4).qarray                               # a 4-bit grid
      >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
      >>> save(path, {"fc1": pack_layer(None, qarray=q), "fc1/bias": b})
      >>> sorted(load(path)[0])
      ['fc1', 'fc1/bias']
    """
    if not isinstance(layers, Mapping):
        raise TypeError(
            f"layers must be a mapping name -> PackedLayer, got {type(layers).__name__}"
        )
    packed = {}
    for name, layer in layers.items():
        _check_name(name)
        packed[name] = (
            layer if isinstance(layer, PackedLayer) else pack_layer(layer, dtype=None, name=name)
        )
    _write(path, packed, metadata, None, overwrite_readonly=overwrite_readonly)


# the manifest errors that malformed (corrupted) records can raise while they are interpreted
_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, OverflowError, IndexError)


def _json_field(header: Mapping[str, str], key: str, path: str):
    try:
        return json.loads(header[key])
    except (ValueError, RecursionError) as e:
        raise CorruptedFileError(
            f"{path!r}: corrupted file: the header field {key!r} is not valid JSON ({e})"
        ) from None


def _parse_header(header: Mapping[str, str], path: str):
    """``(manifest, metadata or None, digest or None)`` of a safetensors header."""
    ours = [k for k in (_MANIFEST_KEY, _METADATA_KEY, _DIGEST_KEY) if k in header]
    if _MANIFEST_KEY not in header:
        if ours:
            raise CorruptedFileError(
                f"{path!r}: corrupted file: the header has {ours} but no manifest (field "
                f"{_MANIFEST_KEY!r} missing)"
            )
        raise ValueError(
            f"{path!r}: not an {FORMAT_NAME} file (a safetensors file without an obcjax "
            f"manifest); use safetensors.numpy.load_file for plain tensors"
        )
    manifest = _json_field(header, _MANIFEST_KEY, path)
    metadata = _json_field(header, _METADATA_KEY, path) if _METADATA_KEY in header else None
    if metadata is not None and not isinstance(metadata, dict):
        raise CorruptedFileError(
            f"{path!r}: corrupted file: the header field {_METADATA_KEY!r} is not a JSON object"
        )
    digest = header.get(_DIGEST_KEY)
    return manifest, metadata, digest


def _check_manifest_head(manifest, path, verified=lambda: False) -> int:
    """The manifest's format version, once its head (format, version, layer table) is sound.

    ``verified()`` tells whether the file's digest verifies: a version newer than ours is
    reported as such only then (otherwise it is as likely a damaged digit).
    """
    if not isinstance(manifest, dict):
        raise CorruptedFileError(f"{path!r}: corrupted file: the manifest is not a JSON object")
    if manifest.get("format") != FORMAT_NAME:
        raise CorruptedFileError(
            f"{path!r}: not an {FORMAT_NAME} file: the manifest's field 'format' is "
            f"{manifest.get('format')!r} (a corrupted header, or another tool's manifest)"
        )
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CorruptedFileError(
            f"{path!r}: corrupted file: invalid format_version {version!r} (field 'format_version')"
        )
    if version > FORMAT_VERSION:
        if verified():
            raise ValueError(
                f"{path!r}: written with format version {version} (obcjax "
                f"{manifest.get('obcjax_version')}), newer than the version {FORMAT_VERSION} "
                f"this obcjax reads; upgrade obcjax to load it"
            )
        raise CorruptedFileError(
            f"{path!r}: corrupted file: the field 'format_version' says {version}, newer than "
            f"the version {FORMAT_VERSION} this obcjax reads, and the digest does not verify; if "
            f"a newer obcjax wrote it, upgrade obcjax"
        )
    if not isinstance(manifest.get("layers"), dict):
        raise CorruptedFileError(
            f"{path!r}: corrupted file: the manifest has no layer table (field 'layers')"
        )
    return version


def _tensor_table(records: Mapping[str, Any], path: str) -> dict[str, tuple[str, str, dict]]:
    """``{safetensors key: (layer, part, tensor record)}`` of the manifest."""
    expected: dict[str, tuple[str, str, dict]] = {}
    for name, rec in records.items():
        tens = rec.get("tensors") if isinstance(rec, dict) else None
        try:
            for part, trec in tens.items():
                key = trec["key"]
                if not isinstance(key, str) or key in expected:
                    raise ValueError(key)
                expected[key] = (name, part, trec)
        except (AttributeError, KeyError, TypeError, ValueError):
            raise CorruptedFileError(
                f"{path!r}: manifest record of layer {name!r} is malformed (field "
                f"'layers.{name}.tensors'): the file is corrupted"
            ) from None
    return expected


def _layer_from_record(rec, tensors, name: str, path: str) -> PackedLayer:
    try:
        layer = PackedLayer(
            kind=rec["kind"],
            shape=tuple(int(s) for s in rec["shape"]),
            tensors=tensors,
            dtype=rec["dtype"],
            bits=rec["bits"],
            group_size=rec["group_size"],
            granularity=rec["granularity"],
            nm=tuple(rec["nm"]) if rec["nm"] is not None else None,
            nnz=int(rec["nnz"]),
            zero_dtype=rec["zero_dtype"],
        )
        _check_layer(layer, name)
        if layer.zero_dtype is not None:
            _np_dtype(layer.zero_dtype, f"layer {name!r}: zero_dtype")
    except _MALFORMED as e:
        raise CorruptedFileError(
            f"{path!r}: the manifest does not match the tensors of layer {name!r} (corrupted): {e}"
        ) from None
    return layer


def _read(path):
    """``(manifest, {name: PackedLayer}, metadata)``, every check done before returning.

    Checks, in order: the header parses and is ours; the manifest's head; every tensor the
    manifest names is in the file (and nothing else) with its dtype, shape, byte count and
    SHA-256; every layer record describes its tensors and matches its checksum; the digest over
    the whole manifest and the user metadata. Any failure raises :class:`CorruptedFileError`.
    """
    from safetensors import SafetensorError, safe_open

    path = check_readable(path, what="packed file")
    try:
        with safe_open(path, framework="np") as f:
            header = f.metadata() or {}
            keys = set(f.keys())
            manifest, metadata, digest = _parse_header(header, path)
            version = _check_manifest_head(
                manifest, path, lambda: digest == _digest(manifest, metadata)
            )
            records = manifest["layers"]
            expected = _tensor_table(records, path)
            missing = sorted(set(expected) - keys)
            extra = sorted(keys - set(expected))
            if missing or extra:
                raise CorruptedFileError(
                    f"{path!r}: the manifest does not match the tensors (corrupted): missing "
                    f"{missing[:5]}, not in the manifest {extra[:5]}"
                )
            raw = {key: f.get_tensor(key) for key in expected}
    except (SafetensorError, UnicodeDecodeError, OverflowError) as e:
        raise CorruptedFileError(f"{path!r}: truncated or corrupted file ({e})") from None
    layers = {}
    for name, rec in records.items():
        tensors = {}
        for part, trec in rec["tensors"].items():
            key = trec["key"]
            t = raw[key]
            if (
                t.dtype.name != trec.get("dtype")
                or list(t.shape) != list(trec.get("shape", []))
                or t.nbytes != trec.get("nbytes")
            ):
                raise CorruptedFileError(
                    f"{path!r}: the manifest does not match tensor {part!r} of layer {name!r} "
                    f"(corrupted): manifest {trec.get('dtype')} {trec.get('shape')} "
                    f"{trec.get('nbytes')} B, file {t.dtype.name} {list(t.shape)} {t.nbytes} B"
                )
            if version >= 2 and trec.get("sha256") != _tensor_sha(t):
                raise CorruptedFileError(
                    f"{path!r}: checksum mismatch in layer {name!r}, tensor {part!r} (key "
                    f"{key!r}, field 'layers.{name}.tensors.{part}.sha256'): the file is corrupted"
                )
            tensors[part] = t
        layer = _layer_from_record(rec, tensors, name, path)
        if _checksum(rec, None if version >= 2 else tensors) != rec.get("checksum"):
            raise CorruptedFileError(
                f"{path!r}: checksum mismatch in layer {name!r} (field "
                f"'layers.{name}.checksum'): the file is corrupted"
            )
        layers[name] = layer
    if digest is None and version >= 2:
        raise CorruptedFileError(
            f"{path!r}: corrupted file: the header has no digest (field {_DIGEST_KEY!r} missing)"
        )
    if digest is not None and digest != _digest(manifest, metadata):
        raise CorruptedFileError(
            f"{path!r}: corrupted file: the digest over the manifest and the metadata does not "
            f"verify (field {_DIGEST_KEY!r}): the params section (a layout, shape or dtype), the "
            f"user metadata or another manifest field was altered"
        )
    return manifest, layers, metadata if metadata is not None else {}


def load(path) -> tuple[dict[str, PackedLayer], dict]:
    """Read a file written by :func:`save` or :func:`save_params`.

    Returns:
      ``(layers, metadata)``: ``{name: PackedLayer}`` and the metadata dict (``{}`` if none).

    Raises:
      CorruptedFileError: a truncated or damaged file: a checksum, the digest, or a manifest
        field that does not match the tensors (a ``ValueError``; the message names the file
        and the field). Nothing is returned half-loaded.
      ValueError: a newer ``FORMAT_VERSION``, or not an obcjax file.
      IsADirectoryError, FileNotFoundError: ``path`` is a directory / does not exist.
    """
    _, layers, metadata = _read(path)
    return layers, metadata


# ----------------------------------------------------------------------------------------------
# Whole Flax params pytrees
# ----------------------------------------------------------------------------------------------


def _flatten_params(params, what="params") -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(node, prefix):
        for k, v in node.items():
            if not isinstance(k, str) or not k or "/" in k:
                raise ValueError(
                    f"{what}: key {k!r} under {'/'.join(prefix) or '<root>'!r} must be a "
                    f"non-empty str without '/'"
                )
            if isinstance(v, Mapping):
                walk(v, prefix + (k,))
            elif v is None:
                continue
            else:
                out["/".join(prefix + (k,))] = v

    if not isinstance(params, Mapping):
        raise TypeError(f"{what} must be nested dicts of arrays, got {type(params).__name__}")
    walk(params, ())
    return out


def _kernel_matrix_shape(shape, in_axes: int | None = None) -> tuple[int, int]:
    """``(rows, cols)`` of a kernel's matrix whose first ``in_axes`` axes are contracted (default:
    all but the last, as for Dense and Conv; attention projections have other splits, see
    :mod:`obcjax.layout`)."""
    k = len(shape) - 1 if in_axes is None else int(in_axes)
    return (math.prod(shape[k:]), math.prod(shape[:k]))


def _in_axes_for(shape, matrix_shape) -> int | None:
    """The ``in_axes`` whose matrix is ``matrix_shape`` (None for the default split)."""
    if tuple(matrix_shape) == _kernel_matrix_shape(shape):
        return None
    for k in range(len(shape) - 1, 0, -1):
        if tuple(matrix_shape) == _kernel_matrix_shape(shape, k):
            return k
    return -1


def _is_kernel(path: str) -> bool:
    return path.rsplit("/", 1)[-1] == "kernel"


def save_params(
    path,
    params,
    packed: Mapping[str, PackedLayer] | None = None,
    *,
    metadata: dict | None = None,
    overwrite_readonly: bool = False,
) -> None:
    """Save a whole Flax params pytree: packed layers where given, every other leaf as is.

    Args:
      path: destination file (written atomically; its folder must exist).
      params: nested dicts of arrays (the ``"params"`` collection).
      packed: ``{'/'-joined leaf path: PackedLayer}``. A leaf named ``kernel`` is packed as its
        weight matrix ``W = kernel.reshape(-1, out).T`` of shape ``(out, prod(kernel.shape[:-1]))``
        (``kernel.T`` for Dense; a grouped conv's groups stacked along the rows), the layout of
        the solvers; any other leaf as an array of its own shape. Each leaf's dtype is recorded,
        and :func:`load_params` gives it back in that dtype.
      metadata: optional JSON-serialisable dict.
      overwrite_readonly: replace a read-only (no write bit) file; refused by default.

    Raises:
      IsADirectoryError, FileNotFoundError, PermissionError, OSError: as :func:`save`.

    Example:
      >>> import os, tempfile
      >>> from obcjax.specs import NM, Int
      >>> from obcjax.stats import hessian_init, hessian_update
      >>> from obcjax.transforms import compress
      >>> rng = np.random.default_rng(0)
      >>> params = {"fc1": {"kernel": rng.normal(size=(128, 64)).astype(np.float32),
      ...                   "bias": np.zeros(64, np.float32)}}
      >>> stats = {"fc1": hessian_update(hessian_init(128), rng.normal(size=(512, 128)))}
      >>> out = compress(params, stats, [("fc1", (NM(2, 4), Int(4)))])
      >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
      >>> save_params(path, out.params, pack_compressed(out))
      >>> params = load_params(path, like=out.params)
      >>> bool(np.array_equal(params["fc1"]["kernel"], out.params["fc1"]["kernel"]))
      True
    """
    leaves = _flatten_params(params)
    packed = dict(packed or {})
    unknown = sorted(set(packed) - set(leaves))
    if unknown:
        raise ValueError(
            f"save_params: packed layer(s) {unknown[:5]} are not leaves of params; keys must be "
            f"'/'-joined leaf paths such as {next(iter(leaves), 'Dense_0/kernel')!r}"
        )
    layers: dict[str, PackedLayer] = {}
    section: dict[str, Any] = {}
    for p, leaf in leaves.items():
        arr = np.asarray(leaf)
        if p in packed:
            layer = packed[p]
            if not isinstance(layer, PackedLayer):
                raise TypeError(f"layer {p!r}: packed values must be PackedLayers")
            if _is_kernel(p) and arr.ndim >= 2:
                layout = "kernel"
                # a DenseGeneral kernel (attention projections) contracts fewer leading axes
                in_axes = _in_axes_for(arr.shape, layer.shape)
                want = _kernel_matrix_shape(arr.shape, None if in_axes == -1 else in_axes)
            else:
                layout, want, in_axes = "identity", tuple(arr.shape), None
            if tuple(layer.shape) != want:
                hint = (
                    " (W = kernel.reshape(-1, out).T, not the kernel itself)"
                    if layout == "kernel"
                    else ""
                )
                raise ValueError(
                    f"layer {p!r}: packed shape {tuple(layer.shape)} does not fit the param of "
                    f"shape {tuple(arr.shape)}; expected {want}{hint}"
                )
        else:
            layer, layout, in_axes = pack_layer(arr, dtype=None, name=p), "identity", None
        _np_dtype(arr.dtype.name, f"param {p!r}")
        layers[p] = layer
        section[p] = {
            "layout": layout,
            "shape": list(arr.shape),
            "dtype": arr.dtype.name,
            "packed": p in packed,
        }
        if layout == "kernel" and in_axes is not None:
            section[p]["in_axes"] = in_axes
    _write(path, layers, metadata, section, overwrite_readonly=overwrite_readonly)


def _param_record(rec, p: str, path: str) -> tuple[str, tuple[int, ...], np.dtype, bool, Any]:
    """``(layout, shape, dtype, packed, in_axes)`` of one params-section entry, each field
    checked (``in_axes`` None: the kernel's default split)."""

    def bad(field, value):
        return CorruptedFileError(
            f"{path!r}: corrupted file: params entry {p!r} has an invalid {field!r} ({value!r}; "
            f"field 'params.{p}.{field}')"
        )

    if not isinstance(rec, dict):
        raise bad("record", rec)
    layout = rec.get("layout")
    if layout not in _LAYOUTS:
        raise bad("layout", layout)
    shape = rec.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise bad("shape", shape)
    try:
        dtype = _np_dtype(rec.get("dtype"), f"param {p!r}")
    except (TypeError, ValueError):
        raise bad("dtype", rec.get("dtype")) from None
    packed = rec.get("packed")
    if not isinstance(packed, bool):
        raise bad("packed", packed)
    in_axes = rec.get("in_axes")
    if in_axes is not None and (
        layout != "kernel" or not isinstance(in_axes, int) or isinstance(in_axes, bool)
        or not 1 <= in_axes < len(shape)
    ):
        raise bad("in_axes", in_axes)
    return layout, tuple(shape), dtype, packed, in_axes


def load_params(path, *, like=None) -> dict:
    """Load a params pytree written by :func:`save_params`.

    Args:
      path: the file.
      like: optional params pytree of the model; the file must hold exactly its leaf paths with
        the same shapes, or ``ValueError`` lists what differs.

    Returns:
      Nested dicts of numpy arrays, every leaf in the dtype it was saved with (float32,
      bfloat16, float16, integers): packed layers decoded to dense arrays of the original shape
      (kernels in Flax layout), every other leaf as stored. A leaf packed without loss (the
      kernels of :func:`pack_compressed`) comes back bit for bit.

    Raises:
      obcjax.fileio.CorruptedFileError: a damaged file (see :func:`load`), naming the file and
        the field.
      ValueError: the file does not match ``like``, holds no params tree, or is not ours.
    """
    manifest, layers, _ = _read(path)
    path = os.fspath(path)
    section = manifest.get("params")
    if section is None:
        raise ValueError(f"{path!r}: holds packed layers but no params tree; use load()")
    if not isinstance(section, dict) or set(section) != set(layers):
        raise CorruptedFileError(
            f"{path!r}: the params table does not match the layers (corrupted; field 'params')"
        )
    recs = {p: _param_record(r, p, path) for p, r in section.items()}
    if like is not None:
        want = {p: tuple(np.shape(v)) for p, v in _flatten_params(like, "like").items()}
        have = {p: r[1] for p, r in recs.items()}
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        shapes = [
            f"{p}: file {have[p]} vs model {want[p]}"
            for p in want
            if p in have and have[p] != want[p]
        ]
        if missing or extra or shapes:
            raise ValueError(
                f"{path!r} does not match the model's params: missing from the file "
                f"{missing[:5]}, not in the model {extra[:5]}, shape mismatches {shapes[:5]}"
            )
    tree: dict = {}
    for p, (layout, shape, dtype, packed, in_axes) in recs.items():
        layer = layers[p]
        try:
            if packed:
                value = unpack_layer(layer, name=p)[0]
            elif layer.kind == "dense":  # a leaf stored as is
                value = layer.tensors["values"]
            else:
                raise ValueError(f"a leaf stored as is must be kind 'dense', got {layer.kind!r}")
            if layout == "kernel":
                want = _kernel_matrix_shape(shape, in_axes)
                if len(shape) < 2 or tuple(value.shape) != want:
                    raise ValueError(f"{tuple(value.shape)} does not fit its kernel shape {shape}")
                n_in = len(shape) - 1 if in_axes is None else int(in_axes)
                value = np.ascontiguousarray(from_matrices(value[None], Layout(shape, n_in)))
            elif tuple(value.shape) != shape:
                raise ValueError(f"it has shape {tuple(value.shape)}, the param {shape}")
        except ValueError as e:
            raise CorruptedFileError(
                f"{path!r}: layer {p!r} cannot be decoded (corrupted; field 'params.{p}'): {e}"
            ) from None
        if value.dtype != dtype:
            value = value.astype(dtype)
        node = tree
        *parents, leaf = p.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    return tree


def pack_compressed(compressed, *, dtype: str | None = None) -> dict[str, PackedLayer]:
    """Packed kernels of a :class:`obcjax.transforms.Compressed` result, ready for save_params.

    Each compressed layer's kernel becomes one :class:`PackedLayer` of its solvers' matrix
    ``W = kernel.reshape(cols, out).T`` (:func:`obcjax.layout.to_matrices` with the layer's
    layout, a grouped conv's groups one after another along the rows), with its mask and its
    kernel-layout QArray from the ``compressed.masks`` / ``compressed.qarrays`` trees read the
    same way, and the N:M pattern of ``compressed.specs``.

    Args:
      compressed: the result of :func:`obcjax.transforms.compress`.
      dtype: dtype of stored float values (dense, sparse and N:M kinds): None (default) keeps
        the kernel's own dtype (float32, bfloat16, float16), so what was compressed is what is
        stored and :func:`load_params` gives it back bit for bit; ``"float16"`` or
        ``"float32"`` to convert.

    Returns:
      ``{"<layer path>/kernel": PackedLayer}``.

    Example:
      >>> from obcjax.specs import NM
      >>> from obcjax.stats import hessian_init, hessian_update
      >>> from obcjax.transforms import compress
      >>> rng = np.random.default_rng(0)
      >>> params = {"fc1": {"kernel": rng.normal(size=(128, 64)).astype(np.float32)}}
      >>> stats = {"fc1": hessian_update(hessian_init(128), rng.normal(size=(512, 128)))}
      >>> out = compress(params, stats, [("fc1", NM(2, 4))])
      >>> {k: p.kind for k, p in pack_compressed(out).items()}   # then save_params(path, ...)
      {'fc1/kernel': 'nm'}
    """
    leaves = _flatten_params(compressed.params)
    layouts = compressed.layouts or {}
    out = {}
    for layer_path, spec in compressed.specs.items():
        key = f"{layer_path}/kernel" if layer_path else "kernel"
        if key not in leaves:
            raise ValueError(f"pack_compressed: layer {layer_path!r} has no kernel in params")
        kernel = np.asarray(leaves[key])
        if kernel.dtype.kind != "f" and kernel.dtype.name != "bfloat16":
            kernel = kernel.astype(np.float32)
        q = compressed.qarray(layer_path)
        mask = compressed.mask(layer_path)
        lay = q.layout if q is not None else layouts.get(layer_path)
        if lay is None:  # every axis but the last is an input (Dense, Conv)
            lay = Layout(kernel.shape, kernel.ndim - 1, 1)
        # one matrix (out, cols) per layer: a grouped conv's groups one after another
        W = to_matrices(kernel, lay).reshape(-1, lay.cols)
        if mask is not None:
            mask = to_matrices(np.asarray(mask), lay).reshape(-1, lay.cols)
        q = None if q is None else q.as_matrix()
        nm = getattr(spec, "prune", None)
        nm = nm if isinstance(nm, NM) else None
        out[key] = pack_layer(W, mask=mask, qarray=q, nm=nm, dtype=dtype, name=layer_path)
    return out
