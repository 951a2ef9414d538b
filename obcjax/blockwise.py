"""Block-wise sequential compression: one block's activations at a time, forward work O(depth).

:func:`compress_blockwise` is the GPTQ / SparseGPT schedule for models made of repeated blocks (a
transformer's decoder layers, a CNN's stages). The user names the blocks (a regex over module paths,
or a list of paths); then

1. one forward pass per calibration batch captures the **inputs of the first block** (through
   :mod:`obcjax.capture`; the rest of the model is dead code there and XLA drops it), and checks
   that the blocks are chained: block ``i+1``'s first argument is block ``i``'s output, and every
   other argument (rotary tables, masks, flags) is the same for every block;
2. for each block in call order, its layers are compressed **group by group in forward order**:
   layers that read the same input (``q/k/v``; ``gate/up``) form one group, calibrated on the
   block's cached inputs with the earlier groups already compressed
   (:func:`obcjax.calibration.calibrate`), and compressed in one call of
   :func:`obcjax.transforms.compress` (same-shaped layers as one vmapped solve);
3. the compressed block runs once over the cached inputs; its outputs are the next block's inputs.

Each block's layers see exactly the inputs that :func:`obcjax.pipeline.compress_sequential` (which
reruns the whole model for each layer) gives them -- a layer's input never depends on the layers of
its own group -- so both modes give the same masks and codes up to float round-off, with
``O(depth)`` block forwards instead of ``O(depth²)``. Device memory holds one block's parameters and
the activations of one block boundary (all calibration batches); with ``offload=True`` the cached
activations and the finished blocks' parameters live on the host (NumPy) and go to the device one
batch / one block at a time. The job reports the device memory it saw (:func:`device_memory`).

Example:
    >>> from flax import nnx
    >>> from obcjax.specs import Int
    >>> from obcjax.zoo import llama as L
    >>> model = L.llama(vocab=32, dim=16, depth=2, heads=2, seed=0)
    >>> tokens = L.token_batches(L.markov_chain(32), n_batches=2, batch_size=4, seq_len=16)
    >>> out = compress_blockwise(model, None, tokens, [("lm_head", None), (".*", Int(4))],
    ...                          blocks=r"layers_\\d+", solver="gptq")
    >>> [b["groups"] for b in out.blocks][0]
    [['attn/q_proj', 'attn/k_proj', 'attn/v_proj'], ['attn/o_proj'], ['mlp/gate_proj', 'mlp/up_proj'], ['mlp/down_proj']]
    >>> len(out.losses), out.forwards["block_forwards"]
    (14, 10)
    >>> nnx.update(model, out.params)          # the compressed weights, back into the model
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from flax.errors import FlaxError
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from obcjax.calibration import calibrate, shard_batch
from obcjax.capture import BoundModel, CaptureError, LayerCall, layer_kinds
from obcjax.rules import match_rules, normalize_rules
from obcjax.transforms import Compressed, as_layer_spec, compress, find_layers, summarize

__all__ = ["compress_blockwise", "BlockwiseResult", "find_blocks", "device_memory"]


class BlockwiseResult(NamedTuple):
    """What :func:`compress_blockwise` returns.

    Attributes:
      compressed: the :class:`obcjax.transforms.Compressed` record of the whole model (layer keys
        are full '/'-joined paths; ``params`` is the Linen ``params`` collection or the NNX pure
        ``Param`` dict, with NumPy leaves under ``offload=True``). ``params``, ``masks``,
        ``qarrays``, ``losses``, ``specs``, ``summary`` and ``layouts`` read through to it.
      blocks: one dict per block, in call order: ``path``, ``groups`` (the layer groups, paths
        relative to the block, in the order they were compressed), ``seconds`` (wall time of the
        block: calibration, solves and its forward), ``rel_error`` (with ``track_error=True``:
        ``‖y_c − y_d‖ / ‖y_d‖`` of the block's output in the compressed model against the dense
        model, over all calibration batches; else None) and ``memory`` (:func:`device_memory`
        after the block).
      forwards: counts of passes over the calibration batches: ``capture`` (model forwards, 1)
        and ``block_forwards`` (block forwards, calibration passes included).
      memory: ``peak_bytes`` (the largest device footprint seen at the checkpoints: the device
        allocator's ``bytes_in_use`` where it reports it, else the bytes of live JAX arrays on
        the device), ``start_bytes`` (the same measure when the call began: the model, the
        batches and whatever else the process holds), ``added_peak_bytes`` (their difference:
        what the job itself added at its peak), ``source`` (which of the two),
        ``device_peak_bytes_in_use`` (the
        allocator's own peak since the process started, or None) and ``note``.
    """

    compressed: Compressed
    blocks: list[dict[str, Any]]
    forwards: dict[str, Any]
    memory: dict[str, Any]

    params = property(lambda self: self.compressed.params)
    masks = property(lambda self: self.compressed.masks)
    qarrays = property(lambda self: self.compressed.qarrays)
    losses = property(lambda self: self.compressed.losses)
    specs = property(lambda self: self.compressed.specs)
    summary = property(lambda self: self.compressed.summary)
    layouts = property(lambda self: self.compressed.layouts)


def _entry(out: Compressed, kind: str, rel: str):
    """The mask / QArray of layer ``rel`` of a :func:`compress` result (None when it has none)."""
    read = getattr(out, kind, None)
    if callable(read):
        return read(rel)
    return (out.masks if kind == "mask" else out.qarrays).get(rel)


def _record(params, masks, qarrays, losses, specs, summary, layouts) -> Compressed:
    if hasattr(Compressed, "from_flat"):
        return Compressed.from_flat(params, masks, qarrays, losses, specs, summary, layouts)
    return Compressed(params, masks, qarrays, losses, specs, summary, layouts)


# ----------------------------------------------------------------------------- memory


def device_memory(device: jax.Device | None = None) -> dict[str, Any]:
    """Device memory in use now, as far as the backend tells.

    Args:
      device: default ``jax.devices()[0]``.

    Returns:
      ``{"bytes_in_use", "peak_bytes_in_use", "live_array_bytes", "source"}``: the first two
      from ``device.memory_stats()`` (GPU / TPU; None where the backend has none, as on a CPU),
      ``live_array_bytes`` the bytes of the live JAX arrays held on ``device`` (every backend),
      and ``source``: ``"memory_stats"`` when the allocator reported, else ``"live_arrays"``.

    Example:
        >>> m = device_memory()
        >>> m["live_array_bytes"] >= 0 and m["source"] in ("memory_stats", "live_arrays")
        True
    """
    device = jax.devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without an allocator report raise or return None
        stats = None
    live = 0
    for a in jax.live_arrays():
        try:
            for s in a.addressable_shards:
                if s.device == device:
                    live += s.data.nbytes
        except Exception:  # noqa: BLE001 - an array deleted while walking
            continue
    stats = stats or {}
    return {
        "bytes_in_use": stats.get("bytes_in_use"),
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        "live_array_bytes": int(live),
        "source": "memory_stats" if "bytes_in_use" in stats else "live_arrays",
    }


class _Meter:
    def __init__(self):
        self.peak = 0
        self.base = None
        self.source = None

    def check(self) -> dict[str, Any]:
        m = device_memory()
        self.source = m["source"]
        now = m["bytes_in_use"] if m["source"] == "memory_stats" else m["live_array_bytes"]
        if self.base is None:
            self.base = int(now)
        self.peak = max(self.peak, int(now))
        return m


# ----------------------------------------------------------------------------- trees


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def _key(node: Mapping, part: str):
    if part in node:
        return part
    for k in node:
        if str(k) == part:
            return k
    raise KeyError(part)


def _get_sub(tree, path: str):
    node = tree
    for p in _parts(path):
        node = node[_key(node, p)]
    return node


def _has_sub(tree, path: str) -> bool:
    try:
        _get_sub(tree, path)
        return True
    except (KeyError, TypeError):
        return False


def _set_sub(tree, path: str, value):
    parts = _parts(path)

    def rec(node, i):
        node = dict(node)
        k = _key(node, parts[i])
        node[k] = value if i == len(parts) - 1 else rec(node[k], i + 1)
        return node

    return rec(tree, 0)


def _prefix(path: str, rel: str) -> str:
    return f"{path}/{rel}" if rel else path


def _is_array(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def _auto(mesh):
    types = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=types)


def _nnx_node(model: nnx.Module, path: str):
    for parts, node in nnx.iter_graph(model):
        if "/".join(str(p) for p in parts) == path:
            return node
    raise KeyError(path)


# ----------------------------------------------------------------------------- block discovery


def _input(batch, i: int):
    if isinstance(batch, Mapping):
        if "x" not in batch:
            raise ValueError(f"compress_blockwise: batch {i} is a dict without an 'x' entry")
        return batch["x"]
    if isinstance(batch, tuple | list):
        return batch[0]
    return batch


def _matcher(blocks) -> Callable[[str], bool]:
    if isinstance(blocks, str):
        try:
            rx = re.compile(blocks)
        except re.error as e:
            raise ValueError(f"compress_blockwise: blocks={blocks!r} is not a valid regex: {e}") from e
        return lambda p: rx.fullmatch(p) is not None
    if isinstance(blocks, Sequence) and blocks and all(isinstance(b, str) for b in blocks):
        wanted = set(blocks)
        return lambda p: p in wanted
    raise TypeError(
        "compress_blockwise: blocks must be a regex over module paths (e.g. r'layers_\\d+') or a "
        f"non-empty list of module paths, got {blocks!r}"
    )


def _block_types(model, match) -> list[type]:
    if isinstance(model, nnx.Module):
        found = []
        for parts, node in nnx.iter_graph(model):
            p = "/".join(str(x) for x in parts)
            if p and isinstance(node, nnx.Module) and match(p):
                found.append(type(node))
        return list(dict.fromkeys(found))
    return [nn.Module]


def find_blocks(model, variables, batch, blocks, *, apply_kwargs=None, forward=None) -> list[str]:
    """The paths of the blocks ``blocks`` names, in the order the forward pass calls them.

    Args:
      model: a Linen or NNX module; variables: as for :func:`obcjax.calibration.calibrate`.
      batch: one calibration batch (only its shapes are used).
      blocks: a regex (``re.fullmatch`` on '/'-joined module paths) or a list of paths.
      apply_kwargs, forward: how to run the model, as for :func:`compress_blockwise`.

    Raises:
      ValueError: no module matches; a block inside another block; a block called twice; a
        listed path that the forward pass never calls.

    Example:
        >>> from obcjax.zoo import llama as L
        >>> m = L.llama(vocab=32, dim=16, depth=3, heads=2)
        >>> find_blocks(m, None, np.zeros((1, 8), np.int32), r"layers_\\d+")
        ['layers_0', 'layers_1', 'layers_2']
    """
    bound = BoundModel(model, variables, what="compress_blockwise")
    fwd, pick = _forward(forward, apply_kwargs)
    return _discover(bound, model, fwd, pick(batch, 0), blocks)[0]


def _forward(forward, apply_kwargs):
    if forward is not None and not callable(forward):
        raise TypeError("compress_blockwise: forward must be a function forward(module, batch)")
    kwargs = dict(apply_kwargs or {})
    if forward is None:
        return (lambda m, x: m(x, **kwargs)), _input
    if kwargs:
        raise ValueError("compress_blockwise: give either forward= or apply_kwargs=, not both")
    return forward, (lambda b, i: b)


def _discover(bound, model, fwd, batch, blocks):
    match = _matcher(blocks)
    types = _block_types(model, match)
    if not types:
        raise ValueError(f"compress_blockwise: no module path matches blocks={blocks!r}")
    seen: list[str] = []
    defs: dict[str, Any] = {}

    def hook(call: LayerCall, proceed):
        if match(call.path):
            seen.append(call.path)
            if not bound.is_nnx and call.path not in defs:
                defs[call.path] = call.module.clone(parent=None, name=None)
        return proceed(*call.args, **call.kwargs)

    try:
        jax.eval_shape(lambda v, b: bound.run(fwd, b, variables=v, hook=hook, layer_types=types),
                       bound.variables, batch)
    except CaptureError:
        raise
    except (TypeError, ValueError, IndexError, KeyError, FlaxError) as e:
        raise CaptureError(f"compress_blockwise: batch 0 did not run through the model: "
                           f"{type(e).__name__}: {e}") from e
    if not seen:
        raise ValueError(f"compress_blockwise: the forward pass called no module matching "
                         f"blocks={blocks!r}")
    twice = sorted({p for p in seen if seen.count(p) > 1})
    if twice:
        raise ValueError(f"compress_blockwise: block(s) {twice} are called more than once per "
                         "forward pass (shared weights); block-wise mode needs each block once")
    for a in seen:
        for b in seen:
            if a != b and b.startswith(a + "/"):
                raise ValueError(f"compress_blockwise: block {b!r} is inside block {a!r}; name "
                                 "blocks that do not nest")
    if not isinstance(blocks, str):
        missing = [b for b in blocks if b not in seen]
        if missing:
            raise ValueError(f"compress_blockwise: listed block(s) {missing} are not called by "
                             f"the forward pass (called: {seen})")
    return seen, defs, types


# ----------------------------------------------------------------------------- the block calls


class _Sig(NamedTuple):
    """The static part of a block call: the (args, kwargs) tree with its non-array leaves."""

    treedef: Any
    static: tuple  # (position, value) of non-array leaves
    n: int  # leaves in all
    x: int  # index among the array leaves of the chained input (the first array of args)

    def build(self, arrays):
        leaves, it = [None] * self.n, iter(arrays)
        fixed = dict(self.static)
        for i in range(self.n):
            leaves[i] = fixed[i] if i in fixed else next(it)
        return jax.tree.unflatten(self.treedef, leaves)


def _split_call(args, kwargs):
    leaves, treedef = jax.tree.flatten((tuple(args), dict(kwargs)))
    arrays = [x for x in leaves if _is_array(x)]
    static = tuple((i, x) for i, x in enumerate(leaves) if not _is_array(x))
    n_args = len(jax.tree.leaves(tuple(args)))
    firsts = [j for j, (i, x) in enumerate((i, x) for i, x in enumerate(leaves) if _is_array(x))
              if i < n_args]
    if not firsts:
        raise ValueError("compress_blockwise: a block is called without an array argument; its "
                         "first array argument must be the hidden state")
    return _Sig(treedef, static, len(leaves), firsts[0]), arrays


def _first_array(out):
    for leaf in jax.tree.leaves(out):
        if _is_array(leaf):
            return leaf
    raise ValueError("compress_blockwise: a block returned no array")


@functools.lru_cache(maxsize=64)
def _block_forward(sig) -> Callable:
    """``forward(module, arrays)`` of a block call; one function object per call signature, so
    calibration reuses its compiled steps across blocks and calls (its cache keys on it)."""

    def forward(module, arrays):
        return _call_block(module, sig, arrays)

    return forward


def _call_block(module, sig: _Sig, arrays):
    args, kwargs = sig.build(arrays)
    return module(*args, **kwargs)


# ----------------------------------------------------------------------------- public API


def compress_blockwise(
    model,
    variables,
    batches: Sequence[Any],
    rules,
    *,
    blocks: str | Sequence[str],
    apply_kwargs: Mapping[str, Any] | None = None,
    forward: Callable | None = None,
    layer_types: Sequence[str] = ("Dense", "Conv", "DenseGeneral"),
    solver: str = "obc",
    rel_damp: float = 0.01,
    method: str = "auto",
    dead_inputs: str = "zero",
    offload: bool = False,
    track_error: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = False,
) -> BlockwiseResult:
    """Compress a model block by block, each block calibrated on the compressed blocks before it.

    Args:
      model: a Linen or NNX module (not modified). Its blocks must be chained: each named block
        is called once per forward pass, its first array argument is the previous block's output
        (for the first block: whatever the model computes before it, e.g. the embedding), and its
        other arguments are the same for every block.
      variables: Linen: the variable dict; NNX: None (the model's own state) or the pure dict of
        its ``nnx.Param`` state.
      batches: a non-empty sequence of calibration batches (arrays, ``(x, ...)`` tuples,
        ``{"x": ...}`` dicts, or anything ``forward`` takes). It is run through the model once.
      rules: ordered ``(regex, spec)`` rules over full layer paths, as for
        :func:`obcjax.transforms.compress`. A layer outside every block that the rules would
        compress is an error (give it a ``(regex, None)`` rule, as ``("lm_head", None)``).
      blocks: a regex (``re.fullmatch`` on '/'-joined module paths, e.g. ``r"layers_\\d+"``) or
        a list of module paths. NNX: attribute paths of sub-modules; Linen: ``module.path``.
      apply_kwargs, forward: how to run the model, as for :func:`obcjax.calibration.calibrate`.
      layer_types: the layer kinds inside blocks to calibrate and compress (see
        :data:`obcjax.capture.LAYER_TYPES`).
      solver, rel_damp, method, dead_inputs: as for :func:`obcjax.transforms.compress`.
      offload: keep the cached activations and the finished blocks' parameters on the host
        (NumPy), moving one batch / one block to the device at a time. Give the variables as
        NumPy arrays too (``jax.device_get``) for the device to hold one block's parameters only.
      track_error: also run the dense model block by block on its own activations and report
        each block's relative output error against it (one more block forward per block, and a
        second activation cache).
      mesh: data-parallel calibration: every batch's leading axis is sharded over the mesh's
        devices (see :func:`obcjax.calibration.calibrate`); the block forwards run sharded too.
      progress: a tqdm bar over blocks.

    Returns:
      A :class:`BlockwiseResult` (params, masks, codes, losses as :class:`Compressed`, plus the
      per-block times, errors and memory, and the forward counts).

    Raises:
      ValueError: empty batches; a blocks argument that matches nothing, nests or repeats; blocks
        that are not chained (the argument that differs is named); rules that leave every layer
        in the blocks dense or compress a layer outside them.
      TypeError: a blocks argument of another type.

    Example:
        >>> import flax.linen as nn
        >>> from obcjax.specs import Unstructured
        >>> class Block(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         return x + nn.Dense(8, name="fc2")(nn.relu(nn.Dense(16, name="fc1")(x)))
        >>> class Net(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         for i in range(3):
        ...             x = Block(name=f"block{i}")(x)
        ...         return nn.Dense(2, name="head")(x)
        >>> x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
        >>> variables = Net().init(jax.random.key(0), x)
        >>> out = compress_blockwise(Net(), variables, [x[:32], x[32:]],
        ...                          [("head", None), (".*", Unstructured(0.5))], blocks=r"block\\d")
        >>> [b["path"] for b in out.blocks], sorted(out.losses)[:2]
        (['block0', 'block1', 'block2'], ['block0/fc1', 'block0/fc2'])
    """
    batches = list(batches) if batches is not None else []
    if not batches:
        raise ValueError("compress_blockwise: batches is empty; give at least one calibration batch")
    kinds = layer_kinds(layer_types, what="compress_blockwise")
    if isinstance(rules, Mapping):
        rules = list(rules.items())
    compiled = normalize_rules(rules, what="layer")
    fwd, pick = _forward(forward, apply_kwargs)
    bound = BoundModel(model, variables, what="compress_blockwise")
    is_nnx = bound.is_nnx
    if is_nnx:
        if variables is not None and not isinstance(variables, Mapping):
            raise TypeError("compress_blockwise: NNX variables must be None or the pure dict of "
                            "the model's nnx.Param state")
        params0 = nnx.state(model, nnx.Param).to_pure_dict() if variables is None else variables
    else:
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise TypeError("compress_blockwise: a Linen model needs its variables as a dict "
                            "with a 'params' entry")
        params0 = variables["params"]
    inputs = [pick(b, i) for i, b in enumerate(batches)]
    meter = _Meter()
    meter.check()

    order, linen_defs, block_types = _discover(bound, model, fwd, inputs[0], blocks)

    # --- rules -> specs over full layer paths; every chosen layer must be inside a block
    layers = find_layers(params0)
    chosen = match_rules(list(layers), compiled, what="layer")
    specs = {p: as_layer_spec(v, solver) for p, v in chosen.items()}
    specs = {p: s for p, s in specs.items() if s is not None and (s.prune or s.quant)}
    outside = [p for p in specs if not any(p.startswith(b + "/") for b in order)]
    if outside:
        raise ValueError(
            f"compress_blockwise: the rules compress layer(s) {outside} outside every block "
            f"({order}); block-wise mode compresses layers inside blocks only -- exclude them with "
            "a (regex, None) rule or name blocks that contain them"
        )
    if not specs:
        raise ValueError("compress_blockwise: the rules leave every layer in the blocks dense")

    # --- 1. capture the first block's inputs (one model forward per batch), check the chain
    first = order[0]
    nxt = order[1] if len(order) > 1 else None
    record: dict[str, Any] = {}

    def capture(v, batch):
        calls: dict[str, tuple] = {}

        def hook(call: LayerCall, proceed):
            if call.path not in order:
                return proceed(*call.args, **call.kwargs)
            sig, arrays = _split_call(call.args, call.kwargs)
            out = proceed(*call.args, **call.kwargs)
            calls[call.path] = (sig, arrays, out)
            return out

        bound.run(fwd, batch, variables=v, hook=hook, layer_types=block_types)
        sig0, arr0, out0 = calls[first]
        checks = {}
        for p in order[1:]:
            sig, arr, _ = calls[p]
            if sig.treedef != sig0.treedef or sig.x != sig0.x or len(arr) != len(arr0):
                raise ValueError(
                    f"compress_blockwise: block {p!r} is called with arguments of another "
                    f"structure than block {first!r} ({sig.treedef} vs {sig0.treedef}); block-wise "
                    "mode needs blocks called alike"
                )
            if repr(sig.static) != repr(sig0.static):
                raise ValueError(
                    f"compress_blockwise: block {p!r} is called with other non-array arguments "
                    f"than block {first!r} ({sig.static} vs {sig0.static})"
                )
            for j, (a, b) in enumerate(zip(arr, arr0, strict=True)):
                if j == sig0.x:
                    continue
                if a.shape != b.shape:
                    checks[(p, str(j))] = jnp.asarray(False)
                else:
                    checks[(p, str(j))] = jnp.array_equal(a, b)
        if nxt is not None:
            y0 = _first_array(out0)
            x1 = calls[nxt][1][sig0.x]
            checks[(nxt, "chain")] = (jnp.array_equal(x1, y0) if x1.shape == y0.shape
                                      else jnp.asarray(False))
        record["sig"] = sig0
        return arr0, checks

    run_capture = jax.jit(capture)
    cache_x, cache_aux = [], []
    forwards = {"capture": 1, "block_forwards": 0}
    host = (lambda a: np.asarray(jax.device_get(a))) if offload else (lambda a: a)
    capture_vars = bound.variables
    if mesh is not None:
        capture_vars = jax.device_put(capture_vars, NamedSharding(_auto(mesh), P()))
    for i, batch in enumerate(inputs):
        if mesh is not None:
            batch = shard_batch(batch, mesh)
        arrays, checks = run_capture(capture_vars, batch)
        if i == 0:
            bad = [k for k, ok in jax.device_get(checks).items() if not bool(ok)]
            if bad:
                p, j = bad[0]
                what = ("its input is not the output of the block before it (something runs "
                        "between the blocks)") if j == "chain" else (
                        f"its array argument {j} differs from block {first!r}'s")
                raise ValueError(
                    f"compress_blockwise: blocks are not chained at block {p!r}: {what}; "
                    "block-wise mode needs each block's first argument to be the previous block's "
                    "output and the other arguments shared"
                )
        sig = record["sig"]
        cache_x.append(host(arrays[sig.x]))
        cache_aux.append([host(a) for j, a in enumerate(arrays) if j != sig.x])
    del arrays, checks, batch
    meter.check()
    dense_x = list(cache_x) if track_error else None

    def block_inputs(xs, i):
        aux = list(cache_aux[i])
        arrays = aux[: sig.x] + [xs[i]] + aux[sig.x:]
        if mesh is not None:
            return shard_batch(tuple(arrays), mesh)
        return tuple(jax.device_put(a) if isinstance(a, np.ndarray) else a for a in arrays)

    block_fwd = _block_forward(_HashSig(sig))

    # --- 2./3. block by block
    new_params = params0
    if offload:
        new_params = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params0)
    masks, qarrays, losses, layouts, reports = {}, {}, {}, {}, []
    it = order
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(order, desc="blockwise", unit="block")
    apply_block = _block_runner(is_nnx)
    for path in it:
        t0 = time.perf_counter()
        if is_nnx:
            sub = _nnx_node(model, path)
            bparams = _get_sub(new_params, path)
            bvars = bparams
            bmodel = sub
        else:
            bmodel = linen_defs[path]
            bvars = {c: _get_sub(variables[c], path) for c in variables
                     if c != "params" and _has_sub(variables[c], path)}
            bparams = _get_sub(new_params, path)
            bvars["params"] = bparams
        if offload:
            bparams = jax.device_put(bparams)
            bvars = _with_params(bvars, bparams, is_nnx)
        block_specs = {p[len(path) + 1:]: s for p, s in specs.items() if p.startswith(path + "/")}
        dense_bvars = bvars
        groups = _groups(bmodel, bvars, fwd=block_fwd, example=block_inputs(cache_x, 0),
                         kinds=kinds, wanted=set(block_specs)) if block_specs else []
        for group in groups:
            stats = calibrate(bmodel, bvars, (block_inputs(cache_x, i) for i in range(len(batches))),
                              rules=[re.escape(r) for r in group], layer_types=kinds,
                              forward=block_fwd, mesh=mesh)
            forwards["block_forwards"] += 1
            out = compress(bparams, stats, [(re.escape(r), block_specs[r]) for r in group],
                           rel_damp=rel_damp, method=method, dead_inputs=dead_inputs)
            bparams = out.params
            bvars = _with_params(bvars, bparams, is_nnx)
            for r in group:
                full = _prefix(path, r)
                if (m := _entry(out, "mask", r)) is not None:
                    masks[full] = jax.device_get(m) if offload else m
                if (q := _entry(out, "qarray", r)) is not None:
                    qarrays[full] = jax.device_get(q) if offload else q
                losses[full] = out.losses[r]
                if out.layouts and r in out.layouts:
                    layouts[full] = out.layouts[r]
            del stats, out
            meter.check()
        # the compressed block's outputs are the next block's inputs
        err_num = err_den = 0.0
        for i in range(len(batches)):
            y = apply_block(bmodel, bvars, sig, block_inputs(cache_x, i))
            if track_error:
                yd = apply_block(bmodel, dense_bvars, sig, block_inputs(dense_x, i))
                d = jnp.asarray(y, jnp.float32) - jnp.asarray(yd, jnp.float32)
                err_num += float(jnp.sum(d * d))
                err_den += float(jnp.sum(jnp.square(jnp.asarray(yd, jnp.float32))))
                dense_x[i] = host(yd)
                del yd, d
            cache_x[i] = host(y)
            del y
        forwards["block_forwards"] += 1 + int(track_error)
        new_params = _set_sub(new_params, path, jax.tree.map(host, bparams) if offload else bparams)
        del bvars, dense_bvars, bparams
        mem = meter.check()
        reports.append({
            "path": path,
            "groups": [list(g) for g in groups],
            "seconds": time.perf_counter() - t0,
            "rel_error": (float(np.sqrt(err_num / max(err_den, 1e-30))) if track_error else None),
            "memory": mem,
        })
    forwards["block_forwards_per_block"] = forwards["block_forwards"] / len(order)
    summary = summarize(params0, new_params, specs, losses)
    end = device_memory()
    memory = {
        "peak_bytes": meter.peak,
        "start_bytes": meter.base,
        "added_peak_bytes": meter.peak - meter.base,
        "source": meter.source,
        "device_peak_bytes_in_use": end["peak_bytes_in_use"],
        "note": ("allocator bytes_in_use at the checkpoints (after the capture, each group's "
                 "solve and each block)") if meter.source == "memory_stats" else (
                 "this backend reports no allocator statistics (a CPU): bytes of the live JAX "
                 "arrays on the device at the checkpoints; intermediates inside a jitted call are "
                 "not counted"),
    }
    record = _record(new_params, masks, qarrays, losses, specs, summary, layouts)
    return BlockwiseResult(record, reports, forwards, memory)


def _with_params(bvars, bparams, is_nnx):
    if is_nnx:
        return bparams
    return {**bvars, "params": bparams}


def _groups(bmodel, bvars, *, fwd, example, kinds, wanted) -> list[list[str]]:
    """The block's layers in ``wanted``, grouped by shared input, in forward order."""
    bm = BoundModel(bmodel, bvars, what="compress_blockwise")
    seen: list[tuple[str, Any]] = []

    def hook(call: LayerCall, proceed):
        seen.append((call.path, call.input))  # keeps the tracer alive: ids stay unique
        return proceed(*call.args, **call.kwargs)

    jax.eval_shape(lambda v, b: bm.run(fwd, b, variables=v, hook=hook, layer_types=kinds),
                   bm.variables, example)
    groups: dict[int, list[str]] = {}
    for p, x in seen:
        if p in wanted and p not in sum(groups.values(), []):
            groups.setdefault(id(x), []).append(p)
    missing = sorted(wanted - set(sum(groups.values(), [])))
    if missing:
        raise ValueError(f"compress_blockwise: layer(s) {missing} chosen by the rules are not "
                         "called by their block's forward pass")
    return list(groups.values())


@functools.partial(jax.jit, static_argnums=(0, 2))
def _run_nnx(graphdef, state, sig, arrays):
    return _first_array(_call_block(nnx.merge(graphdef, state), sig, arrays))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _run_linen(module, variables, sig, arrays):
    bm = BoundModel(module, variables, what="compress_blockwise")
    return _first_array(bm.run(_block_forward(sig), arrays))


def _block_runner(is_nnx: bool):
    """``run(block, block_variables, sig, arrays) -> output``, jitted once per block structure."""
    if is_nnx:

        def run(sub, bparams, sig, arrays):
            graphdef, state = nnx.split(sub)
            state = jax.tree.map(lambda a: a, state)
            nnx.replace_by_pure_dict(state, bparams)
            return _run_nnx(graphdef, state, _HashSig(sig), arrays)

        return run

    def run(module, bvars, sig, arrays):
        return _run_linen(module, bvars, _HashSig(sig), arrays)

    return run


class _HashSig:
    """A :class:`_Sig` as a static jit argument (hashed by its tree and static values' reprs)."""

    def __init__(self, sig: _Sig):
        self.sig = sig
        self._key = (sig.treedef, repr(sig.static), sig.n, sig.x)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _HashSig) and self._key == other._key

    def build(self, arrays):
        return self.sig.build(arrays)
