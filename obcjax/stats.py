"""Second-order statistics of layer inputs: ``H = 2/N · Σ x xᵀ`` and the rows ``x`` it is built from.

The layer-wise compression problem of OBC (Frantar & Alistarh, "Optimal Brain Compression",
NeurIPS 2022, §2.2 of ``algorithms/obc.md``) needs, per layer, the Hessian of the squared output
error ``‖W X − Ŵ X‖²`` with respect to one row of ``W``: ``H = 2 X Xᵀ``. This module keeps it as a
running ``(sum, count)`` pair in the shape of an optax transform (``hessian_init`` /
``hessian_update`` / ``hessian_finalize``), and turns layer inputs into the rows ``x``:

* :func:`dense_inputs` for a Dense (``(in, out)`` kernel): every leading dimension is a token.
* :func:`conv_patches` for an N-d convolution (NHWC input, HWIO kernel): im2col with stride,
  padding, input and kernel dilation and feature groups, columns ordered ``(kh, kw, cin_in_group)``
  exactly like ``kernel[..., group_outputs].reshape(-1, out_per_group)``.

Grouped and depthwise convolutions have one Hessian per group (group ``g``'s output channels only see
input channels ``g·cin/G … (g+1)·cin/G − 1``), so every state carries a leading group axis ``G``
(1 for Dense and ordinary convolutions).

No Flax here: the Flax integration lives in :mod:`obcjax.calibration`.

Example:
    >>> x = np.random.default_rng(0).normal(size=(4, 16, 16, 8))    # NHWC conv input
    >>> kernel = jnp.zeros((3, 3, 8, 32))                           # HWIO
    >>> state = hessian_init(cols=3 * 3 * 8)
    >>> state = hessian_update(state, conv_patches(x, kernel.shape, strides=2))
    >>> hessian_finalize(state).shape
    (1, 72, 72)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from obcjax._checks import describe as _describe

__all__ = [
    "HessianState",
    "hessian_init",
    "hessian_update",
    "hessian_finalize",
    "dense_inputs",
    "conv_patches",
    "check_state",
    "check_stats",
    "save_stats",
    "load_stats",
]

_HIGHEST = lax.Precision.HIGHEST


class HessianState(NamedTuple):
    """Running input statistics of one layer.

    Attributes:
      sum: ``(G, cols, cols)`` float32, ``Σ x xᵀ`` over every token seen, per feature group.
      count: ``()`` int32, number of tokens (rows of ``X``) accumulated.
    """

    sum: jax.Array
    count: jax.Array


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _numeric(x, what: str) -> jax.Array:
    """``x`` as a JAX array of a real numeric (or bool) dtype, or a ``TypeError`` naming ``what``."""
    if isinstance(x, jax.Array | np.ndarray) or _is_traced(x):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as e:  # ragged nested lists
            raise TypeError(f"{what} must be a numeric array, got {_describe(x)} ({e})") from None
    dtype = np.dtype(arr.dtype) if not _is_traced(arr) else arr.dtype
    if not (
        jnp.issubdtype(dtype, jnp.floating)
        or jnp.issubdtype(dtype, jnp.integer)
        or jnp.issubdtype(dtype, jnp.bool_)
    ):
        raise TypeError(
            f"{what} must be a real numeric array, got {_describe(x)}"
        )
    return jnp.asarray(arr)


def check_state(state, layer: str | None = None) -> HessianState:
    """Check that ``state`` is one layer's statistics, a :class:`HessianState`, before any work.

    Static checks only (types, shapes, dtypes), so it also runs on traced states; the values
    (no token, NaN or inf) are checked by :func:`hessian_finalize`.

    Args:
      state: ``HessianState(sum (G, cols, cols) or (cols, cols), count ())``, as
        :func:`obcjax.calibration.calibrate` returns per layer.
      layer: the layer's path, named in errors.

    Returns:
      ``state``.

    Raises:
      TypeError: ``state`` is not a :class:`HessianState` (for example an already finalized
        Hessian array, or a dict), or its fields are not numeric arrays. ValueError: its ``sum``
        is not square ``(G, cols, cols)`` or its ``count`` is not a scalar.

    Example:
        >>> check_state(hessian_init(4), layer="fc1").sum.shape
        (1, 4, 4)
        >>> check_state(jnp.eye(4), layer="fc1")
        Traceback (most recent call last):
        ...
        TypeError: layer 'fc1': statistics: expected a HessianState(sum, count) from obcjax.calibration.calibrate, got an array of shape (4, 4) (float32) ...
    """
    name = f"layer {layer!r}: statistics" if layer else "statistics"
    total = getattr(state, "sum", None)
    count = getattr(state, "count", None)
    if not isinstance(state, HessianState) and (callable(total) or callable(count)):
        total = count = None  # a tuple's .count / an array's .sum are methods, not fields
    if total is None or count is None:
        hint = ""
        shape = getattr(state, "shape", None)
        if isinstance(shape, tuple) and len(shape) in (2, 3):
            hint = (
                " (a finalized Hessian?); pass calibrate's output itself, not "
                "obcjax.calibration.finalize's or hessian_finalize's"
            )
        raise TypeError(
            f"{name}: expected a HessianState(sum, count) from obcjax.calibration.calibrate, got "
            f"{_describe(state)}{hint}"
        )
    total = _numeric(total, f"{name}: sum")
    count = _numeric(count, f"{name}: count")
    if total.ndim not in (2, 3) or total.shape[-1] != total.shape[-2] or total.shape[-1] < 1:
        raise ValueError(
            f"{name}: sum must be (groups, cols, cols) with cols >= 1, got shape "
            f"{tuple(total.shape)}"
        )
    if count.ndim != 0:
        raise ValueError(
            f"{name}: count must be a scalar (the number of tokens), got shape {tuple(count.shape)}"
        )
    return state


def check_stats(stats, paths, *, what: str, arrays: bool = False) -> None:
    """Check, before any work, that ``stats`` holds valid statistics for every layer of ``paths``.

    Args:
      stats: ``{path: HessianState}`` from :func:`obcjax.calibration.calibrate`.
      paths: the layers that need statistics.
      what: the caller's name (``"compress"``), for error messages.
      arrays: also accept a Hessian array ``(cols, cols)`` / ``(G, cols, cols)`` per layer.

    Raises:
      TypeError: ``stats`` is not a mapping, or a layer's entry is not a :class:`HessianState`
        (nor, with ``arrays``, a numeric array); the message names the layer, what was expected
        and what was given. ValueError: layers without statistics (named, with the layers the
        statistics hold), or a malformed entry.

    Example:
        >>> check_stats({"fc1": hessian_init(4)}, ["fc1", "fc2"], what="compress")
        Traceback (most recent call last):
        ...
        ValueError: compress: no calibration statistics for layer(s) ['fc2']; the statistics hold ['fc1'] -- were they captured from this model?
    """
    if not isinstance(stats, Mapping):
        raise TypeError(
            f"{what}: stats must be a mapping {{layer path: HessianState}} from "
            f"obcjax.calibration.calibrate, got {_describe(stats)}"
        )
    paths = list(paths)
    missing = [p for p in paths if p not in stats]
    if missing:
        held = sorted(map(str, stats))
        shown = held if len(held) <= 20 else held[:20] + [f"... ({len(held)} in all)"]
        raise ValueError(
            f"{what}: no calibration statistics for layer(s) {missing}; the statistics hold "
            f"{shown} -- were they captured from this model?"
        )
    for p in paths:
        value = stats[p]
        if arrays and not hasattr(value, "count") and hasattr(value, "shape"):
            H = _numeric(value, f"{what}: layer {p!r}: statistics")
            if H.ndim not in (2, 3) or H.shape[-1] != H.shape[-2] or H.shape[-1] < 1:
                raise ValueError(
                    f"{what}: layer {p!r}: statistics must be a HessianState or a Hessian array "
                    f"(cols, cols) / (groups, cols, cols), got shape {tuple(H.shape)}"
                )
            continue
        try:
            check_state(value, p)
        except (TypeError, ValueError) as e:
            also = " or a Hessian array (cols, cols) / (groups, cols, cols)" if arrays else ""
            msg = str(e)
            if also:
                msg = msg.replace("from obcjax.calibration.calibrate", f"from obcjax.calibration.calibrate{also}", 1)
            raise type(e)(f"{what}: {msg}") from None


def hessian_init(cols: int, groups: int = 1) -> HessianState:
    """An empty accumulator for a layer with ``cols`` input columns per group.

    Args:
      cols: width of one group's Hessian (``in`` for Dense, ``kh·kw·cin/G`` for a conv).
      groups: number of feature groups ``G`` (``feature_group_count`` of a conv, else 1).

    Returns:
      A :class:`HessianState` of zeros: ``sum (G, cols, cols)`` float32, ``count ()`` int32.
    """
    for name, v in (("cols", cols), ("groups", groups)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise TypeError(f"hessian_init: {name} must be an int >= 1, got {v!r}")
    cols, groups = int(cols), int(groups)
    if cols < 1 or groups < 1:
        raise ValueError(f"hessian_init: cols and groups must be >= 1, got cols={cols}, groups={groups}")
    return HessianState(
        jnp.zeros((groups, cols, cols), jnp.float32), jnp.zeros((), jnp.int32)
    )


def hessian_update(state: HessianState, x: jax.typing.ArrayLike, mask=None) -> HessianState:
    """Add the outer products of the rows of ``x`` to ``state``: ``sum += xᵀ x``, ``count += tokens``.

    Args:
      state: the running :class:`HessianState` (``sum (G, cols, cols)``).
      x: ``(tokens, G, cols)`` rows per group, or ``(tokens, cols)`` when ``G == 1``. Any float
        dtype; the product is taken in float32 with ``Precision.HIGHEST`` (TF32 would lose ~3
        digits on GPUs).
      mask: optional ``(tokens,)`` booleans; rows where it is False are left out (padding tokens).

    Returns:
      The new state; ``state`` is not modified. Works inside ``jit``.
    """
    check_state(state)
    x = _numeric(x, "hessian_update: x")
    G, cols = (1, state.sum.shape[-1]) if state.sum.ndim == 2 else state.sum.shape[:2]
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3 or x.shape[1:] != (G, cols):
        raise ValueError(
            f"hessian_update: x of shape {tuple(x.shape)} does not fit a state of {G} group(s) of "
            f"width {cols}; expected (tokens, {G}, {cols})" + (" or (tokens, cols)" if G == 1 else "")
        )
    x = x.astype(jnp.float32)
    if mask is None:
        count = jnp.asarray(x.shape[0], jnp.int32)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != x.shape[:1]:
            raise ValueError(
                f"hessian_update: mask of shape {tuple(mask.shape)} must be (tokens,) = {x.shape[:1]}"
            )
        x = jnp.where(mask[:, None, None], x, 0.0)
        count = jnp.sum(mask, dtype=jnp.int32)
    xtx = jnp.einsum("tgi,tgj->gij", x, x, precision=_HIGHEST)
    return HessianState(state.sum + xtx, state.count + count)


def hessian_finalize(state: HessianState, *, layer: str | None = None) -> jax.Array:
    """The Hessian ``H = 2 · sum / count``, shape ``(G, cols, cols)`` float32.

    Normalised per token (row of ``X``), not per image as in the OBC reference, whose ``H`` grows
    with the number of spatial positions. Only *relative* damping (a fraction of ``mean(diag H)``)
    is used downstream, so the overall scale does not change any result.

    Args:
      state: a :class:`HessianState`.
      layer: name used in error messages.

    Returns:
      ``H: (G, cols, cols)``.

    Raises:
      ValueError: (outside ``jit`` only) if no token was accumulated or the sum is not finite.
    """
    name = f"layer {layer!r}" if layer else "hessian_finalize"
    check_state(state, layer)
    total, count = jnp.asarray(state.sum), jnp.asarray(state.count)
    if not isinstance(count, jax.core.Tracer) and int(count) <= 0:
        raise ValueError(
            f"{name}: no token was accumulated (count = {int(count)}); the layer received no "
            "input during calibration -- was it called by the model on a non-empty batch?"
        )
    if not isinstance(total, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(total))):
        raise ValueError(
            f"{name}: the accumulated statistics contain NaN or inf; the calibration data or the "
            "activations feeding this layer are not finite"
        )
    return 2.0 * total / count.astype(jnp.float32)


def dense_inputs(x: jax.typing.ArrayLike) -> jax.Array:
    """Rows of a Dense layer's input: ``(..., in) -> (tokens, in)``, all leading dims flattened."""
    x = _numeric(x, "dense_inputs: x")
    if x.ndim < 1:
        raise ValueError("dense_inputs: a Dense input needs a feature axis, got a scalar")
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _tuple(v, n: int, what: str) -> tuple[int, ...]:
    if v is None:
        v = 1
    if isinstance(v, int | np.integer):
        return (int(v),) * n
    v = tuple(int(i) for i in v)
    if len(v) != n:
        raise ValueError(f"conv_patches: {what} {v} must have one entry per spatial dim ({n})")
    return v


def _explicit_padding(padding, nd: int):
    """Flax's canonicalisation: str, int, or a length-``nd`` sequence of ints / (lo, hi) pairs."""
    if isinstance(padding, str):
        return padding.upper()
    if isinstance(padding, int | np.integer):
        return [(int(padding), int(padding))] * nd
    pads = []
    for p in padding:
        if isinstance(p, int | np.integer):
            pads.append((int(p), int(p)))
        elif len(p) == 2:
            pads.append((int(p[0]), int(p[1])))
        else:
            raise ValueError(f"conv_patches: bad padding entry {p!r}")
    if len(pads) != nd:
        raise ValueError(
            f"conv_patches: padding {padding!r} must be a string, an int, or {nd} ints / (lo, hi) "
            "pairs"
        )
    return pads


def _prepare(x, kernel_shape, strides, padding, dilation, feature_group_count, input_dilation):
    """Canonicalise the geometry like Flax, pad ``x``; return it and the output spatial shape."""
    try:
        kernel_shape = tuple(int(k) for k in kernel_shape)
    except (TypeError, ValueError):
        raise TypeError(
            f"conv_patches: kernel_shape must be a sequence of ints (*spatial, in/G, out), got "
            f"{kernel_shape!r}"
        ) from None
    nd = len(kernel_shape) - 2
    if nd < 1:
        raise ValueError(
            f"conv_patches: kernel_shape {kernel_shape} must be (*spatial, in/G, out) (Flax HWIO)"
        )
    ks = kernel_shape[:nd]
    strides = _tuple(strides, nd, "strides")
    dilation = _tuple(dilation, nd, "dilation")
    input_dilation = _tuple(input_dilation, nd, "input_dilation")
    G = int(feature_group_count)
    nb = x.ndim - (nd + 1)
    if nb < 0:
        raise ValueError(
            f"conv_patches: input of shape {tuple(x.shape)} has too few dims for a {nd}-d conv; "
            f"expected (*batch, {'spatial, ' * nd}channels)"
        )
    # Flax flattens every batch dim into one and adds one to an unbatched input.
    x = x.reshape((-1,) + x.shape[nb:])
    cin = x.shape[-1]
    if G < 1 or cin % G or cin // G != kernel_shape[-2]:
        raise ValueError(
            f"conv_patches: {cin} input channels in {G} group(s) do not fit a kernel of shape "
            f"{kernel_shape} (expected in/G = {kernel_shape[-2]})"
        )
    eff = [(k - 1) * d + 1 for k, d in zip(ks, dilation)]
    pad = _explicit_padding(padding, nd)
    if pad in ("CIRCULAR", "REFLECT"):
        mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[pad]
        x = jnp.pad(x, [(0, 0)] + [((e - 1) // 2, e // 2) for e in eff] + [(0, 0)], mode=mode)
        pad = "VALID"
    elif pad == "CAUSAL":
        if nd != 1:
            raise ValueError("conv_patches: 'CAUSAL' padding is only defined for 1-d convolutions")
        x = jnp.pad(x, [(0, 0), (eff[0] - 1, 0), (0, 0)])
        pad = "VALID"
    if isinstance(pad, str):
        if any(d != 1 for d in input_dilation):
            raise ValueError(
                "conv_patches: string padding with input_dilation != 1 is not defined (as in "
                "lax.conv_general_dilated); give explicit (lo, hi) pairs"
            )
        if pad not in ("SAME", "VALID", "SAME_LOWER"):
            raise ValueError(
                f"conv_patches: unknown padding {pad!r}; use 'SAME', 'VALID', 'SAME_LOWER', "
                "'CIRCULAR', 'REFLECT', 'CAUSAL', an int or (lo, hi) pairs"
            )
        pad = lax.padtype_to_pads(x.shape[1:-1], eff, strides, pad)
    # lax.pad does input dilation (interior) and explicit, possibly negative, padding in one go.
    cfg = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(pad, input_dilation)] + [(0, 0, 0)]
    x = lax.pad(x, jnp.zeros((), x.dtype), cfg)
    out = tuple(max(0, (n - e) // s + 1) for n, e, s in zip(x.shape[1:-1], eff, strides))
    return x, ks, strides, dilation, G, out


def conv_patches(
    x: jax.typing.ArrayLike,
    kernel_shape: Sequence[int],
    *,
    strides=1,
    padding="SAME",
    dilation=1,
    feature_group_count: int = 1,
    input_dilation=1,
) -> jax.Array:
    """im2col rows of an N-d convolution, ordered like the flattened Flax kernel.

    Semantics follow ``flax.linen.Conv`` / ``flax.nnx.Conv`` (channels-last input, HWIO kernel):
    extra leading batch dims are flattened, an unbatched input gets a batch of one, and padding is
    ``'SAME'``, ``'VALID'``, ``'SAME_LOWER'``, ``'CIRCULAR'``, ``'REFLECT'``, ``'CAUSAL'`` (1-d), an
    int, or per-dim ints / ``(lo, hi)`` pairs. Zero-padding positions are included, as in the OBC
    reference. For every group ``g``::

        conv(x, kernel)[..., g·og:(g+1)·og].reshape(-1, og)
            == patches[:, g, :] @ kernel[..., g·og:(g+1)·og].reshape(-1, og)

    with columns ordered ``(kh, kw, cin_in_group)``. (``lax.conv_general_dilated_patches`` orders
    them channel-major; we slice taps directly instead, which is exact and needs no matmul.)

    Args:
      x: ``(*batch, *spatial, cin)`` input, e.g. NHWC or NWC.
      kernel_shape: the kernel's shape ``(*kernel_spatial, cin/G, out)``.
      strides: int or one per spatial dim.
      padding: see above.
      dilation: kernel dilation (``kernel_dilation`` in Flax), int or one per spatial dim.
      feature_group_count: number of groups ``G`` (``cin`` for depthwise).
      input_dilation: lhs dilation, int or one per spatial dim (needs explicit padding).

    Returns:
      ``(tokens, G, prod(kernel_spatial)·cin/G)`` with ``tokens = N · prod(out_spatial)``.

    Example:
        >>> import flax.linen as nn
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(8, 32, 32, 16)).astype(np.float32)   # NHWC
        >>> k = rng.normal(size=(3, 3, 16, 4)).astype(np.float32)     # HWIO
        >>> p = conv_patches(x, k.shape, strides=2, padding="SAME")
        >>> p.shape                                     # (8·16·16 positions, 1 group, 3·3·16)
        (2048, 1, 144)
        >>> y = p[:, 0] @ k.reshape(-1, k.shape[-1])    # == conv(x, k) flattened
        >>> conv = nn.Conv(4, (3, 3), strides=2, padding="SAME", use_bias=False)
        >>> ref = conv.apply({"params": {"kernel": k}}, x).reshape(-1, 4)
        >>> bool(jnp.allclose(y, ref, atol=1e-4))
        True
    """
    x = _numeric(x, "conv_patches: x")
    x, ks, strides, dilation, G, out = _prepare(
        x, kernel_shape, strides, padding, dilation, feature_group_count, input_dilation
    )
    n, cin = x.shape[0], x.shape[-1]
    taps = []
    for tap in itertools.product(*(range(k) for k in ks)):
        start = [0] + [t * d for t, d in zip(tap, dilation)] + [0]
        limit = (
            [n]
            + [s0 + (o - 1) * s + 1 if o > 0 else s0 for s0, o, s in zip(start[1:-1], out, strides)]
            + [cin]
        )
        taps.append(lax.slice(x, start, limit, [1, *strides, 1]))
    p = jnp.stack(taps, axis=-2)  # (N, *out, taps, cin)
    ntaps, cg = len(taps), cin // G
    tokens = n * math.prod(out)
    p = p.reshape(tokens, ntaps, G, cg).transpose(0, 2, 1, 3)
    return p.reshape(tokens, G, ntaps * cg)


# ----------------------------------------------------------------------------- on disk

_STATS_FORMAT = "obcjax-stats-v1"


def _stats_digest(arrays: Mapping[str, np.ndarray]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_stats(path, stats: Mapping[str, HessianState], *, recipe=None) -> None:
    """Write calibration statistics to one ``.npz`` file, atomically, with a checksum.

    A long job calibrates once and reads the statistics back on a rerun (:func:`load_stats`).

    Args:
      path: the file to write (its folder must exist).
      stats: ``{path: HessianState}`` as :func:`obcjax.calibration.calibrate` returns it; the
        order is kept.
      recipe: anything JSON can hold that says how the statistics were made (data, sizes,
        layers); :func:`load_stats` returns None when asked for another recipe.

    Raises:
      ValueError: ``stats`` is not a dict of HessianState, or ``recipe`` is not JSON data.
      OSError: the file cannot be written (named in the message).

    Example:
        >>> import tempfile, os
        >>> st = {"fc": hessian_update(hessian_init(3), np.eye(3, dtype=np.float32))}
        >>> f = os.path.join(tempfile.mkdtemp(), "stats.npz")
        >>> save_stats(f, st, recipe={"ncalib": 3})
        >>> back = load_stats(f, recipe={"ncalib": 3})
        >>> list(back), int(back["fc"].count)
        (['fc'], 3)
        >>> load_stats(f, recipe={"ncalib": 4}) is None      # made another way: recompute
        True
    """
    import io
    import json

    from obcjax.fileio import atomic_write

    if not isinstance(stats, Mapping) or not stats:
        raise ValueError(f"save_stats: stats must be a non-empty dict of HessianState, got "
                         f"{type(stats).__name__}")
    order = list(stats)
    arrays = {}
    for i, layer in enumerate(order):
        st = stats[layer]
        if not isinstance(st, HessianState):
            raise ValueError(f"save_stats: stats[{layer!r}] is a {type(st).__name__}, expected "
                             "a HessianState")
        arrays[f"{i}/sum"] = np.asarray(jax.device_get(st.sum))
        arrays[f"{i}/count"] = np.asarray(jax.device_get(st.count))
    try:
        meta = json.dumps({"format": _STATS_FORMAT, "order": order, "recipe": recipe,
                           "sha256": _stats_digest(arrays)}, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"save_stats: recipe must be JSON data (dicts, lists, strings, "
                         f"numbers): {e}") from None
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(meta.encode(), np.uint8), **arrays)
    atomic_write(path, buf.getvalue(), what="statistics file")


def load_stats(path, *, recipe=None) -> dict[str, HessianState] | None:
    """Read statistics written by :func:`save_stats`, verified against their checksum.

    Args:
      path: the file.
      recipe: the recipe the caller needs; statistics saved with another one are not returned.

    Returns:
      ``{path: HessianState}`` (NumPy arrays, in the saved order), or None when the file does not
      exist or was saved with another ``recipe``.

    Raises:
      obcjax.fileio.CorruptedFileError: the file exists but is not a statistics file of this
        format, or its contents do not match the checksum (a truncated or altered file): never
        other statistics.
    """
    import json
    import os
    import zipfile

    from obcjax.fileio import CorruptedFileError

    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if "__meta__" not in z.files:
                raise ValueError("no __meta__ entry")
            meta = json.loads(bytes(z["__meta__"]).decode())
            if not isinstance(meta, dict) or meta.get("format") != _STATS_FORMAT:
                raise ValueError(f"format {meta.get('format') if isinstance(meta, dict) else meta!r}")
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise CorruptedFileError(
            f"load_stats: {os.fspath(path)!r} is not a readable obcjax statistics file "
            f"({type(e).__name__}: {e}); delete it to recalibrate"
        ) from None
    if _stats_digest(arrays) != meta.get("sha256"):
        raise CorruptedFileError(
            f"load_stats: {os.fspath(path)!r} does not match its checksum (truncated or altered); "
            "delete it to recalibrate"
        )
    if meta.get("recipe") != json.loads(json.dumps(recipe)):
        return None
    order = meta.get("order") or []
    try:
        return {layer: HessianState(arrays[f"{i}/sum"], arrays[f"{i}/count"])
                for i, layer in enumerate(order)}
    except KeyError as e:
        raise CorruptedFileError(f"load_stats: {os.fspath(path)!r} lacks the entry {e}") from None
