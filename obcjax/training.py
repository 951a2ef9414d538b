"""Fine-tuning under frozen masks and frozen codebooks (optax transforms + a small driver).

OPQ (Hu et al., AAAI 2021) fixes every layer's pruning mask and quantization codebook in one shot
and then trains only the float weights: the forward pass sees ``ŵ = M ⊙ Q(w)`` on the frozen grid,
the backward pass uses the straight-through estimator ``∂ŵ/∂w = M``. Here:

* :func:`keep_mask` -- the one mask transform of obcjax: its state holds the masks (so checkpoints
  of the optimizer state carry them, as in jaxpruner); entries whose mask is False never move
  (zero update), so pruned weights stay exactly 0 and frozen quantized weights stay on their grid
  whatever momentum or weight decay does. Chain it LAST in ``optax.chain``.
* :func:`frozen_codebooks` -- an identity transform whose state holds the codebooks
  (``{layer path: Codebook}``); :func:`get_codebooks` finds them in any (chained) optax state.
* :func:`fake_quantize_params` -- maps float "shadow" params to params whose kernels are
  ``M ⊙ Q(w)`` in value and ``M ⊙ w`` in gradient (STE); :func:`quantize_params` gives the final
  on-grid params.
* :func:`finetune` -- a jitted training loop over a user's loss function, params and batches,
  with all of the above (drivers bound to the zoo: :mod:`obcjax.recipes.finetune`).

**One mask format.** A mask is a params-shaped tree of bool arrays (True = trainable / kept),
``None`` or absent where a leaf is dense: ``{"fc": {"kernel": m}}`` masks one kernel and leaves
its bias and every other layer free. It works the same on nested dicts, ``FrozenDict`` and
``nnx.State`` (leaves are matched by their '/'-joined path, not by the container type), in a
functional loop and inside ``nnx.Optimizer``. :func:`mask_tree` builds one from
``{layer path: kernel mask}``.

Example:
    >>> import optax
    >>> params = {"fc": {"kernel": jnp.array([[0.76, -0.49], [0.0, 1.3]]), "bias": jnp.zeros(2)}}
    >>> masks = {"fc": {"kernel": params["fc"]["kernel"] != 0}}     # e.g. Compressed.masks
    >>> cbs = {"fc": Codebook(scale=jnp.array(0.25), zero=jnp.array(8.0), bits=4)}
    >>> tx = optax.chain(optax.adam(1e-3), frozen_codebooks(cbs), keep_mask(masks))
    >>> state = tx.init(params)
    >>> qp = fake_quantize_params(params, get_codebooks(state), get_masks(state))  # STE forward
    >>> qp["fc"]["kernel"]                                          # on the frozen grid
    Array([[ 0.75, -0.5 ],
           [ 0.  ,  1.25]], dtype=float32)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from obcjax.layout import flatten_paths, path_of, unflatten_paths
from obcjax.quant import QArray, quantize
from obcjax.transforms import find_layers

__all__ = [
    "Codebook",
    "KeepMaskState",
    "CodebookState",
    "keep_mask",
    "frozen_codebooks",
    "get_codebooks",
    "get_masks",
    "mask_tree",
    "pure_params",
    "codebooks_from_qarrays",
    "fake_quantize_params",
    "quantize_params",
    "finetune",
]


class Codebook(NamedTuple):
    """One layer's frozen uniform grid ``scale * (clip(round(w/scale) + zero, 0, 2^bits-1) - zero)``.

    Why not a :class:`~obcjax.quant.QArray`: a ``QArray`` is a *quantized array* -- integer codes
    of weights that no longer change, with the grid they were rounded on. A codebook is the grid
    alone, applied at every step to float "shadow" weights that training keeps changing; it has
    no codes to hold. The relation is exact: a codebook is a ``QArray``'s ``(scale, zero, bits)``
    (:func:`codebooks_from_qarrays` reads it off), and :func:`quantize_params` followed by
    :func:`obcjax.quant.quantize_codes` gives the ``QArray`` of the fine-tuned kernel on it.

    Attributes:
      scale: ``()`` float for a unified (per-tensor) codebook, or any shape broadcastable to the
        kernel (e.g. ``(out,)`` per output channel).
      zero: same shape as ``scale``, integer-valued float.
      bits: grid bits (static: pytree auxiliary data).
    """

    scale: jax.Array
    zero: jax.Array
    bits: int


jax.tree_util.register_pytree_node(
    Codebook, lambda c: ((c.scale, c.zero), c.bits), lambda bits, ch: Codebook(*ch, bits)
)


class KeepMaskState(NamedTuple):
    """State of :func:`keep_mask`: ``{leaf path: bool mask}`` of the masked leaves only."""

    masks: dict[str, jax.Array]


class CodebookState(NamedTuple):
    """State of :func:`frozen_codebooks`: ``{layer path: Codebook}``."""

    codebooks: dict[str, Codebook]


def pure_params(tree):
    """``tree`` with ``nnx.Variable`` leaves replaced by their arrays (other trees unchanged).

    The transforms of obcjax accept nested dicts, ``FrozenDict`` and ``nnx.State`` (what
    ``nnx.Optimizer`` hands to ``tx.init``: a state of ``nnx.Param`` variables).

    Example:
      >>> from flax import nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> pure_params(nnx.state(model, nnx.Param))["kernel"].shape
      (2, 3)
    """
    return nnx.as_pure(tree)


def _map_leaves(fn: Callable[[str, Any], Any], tree):
    """``tree`` (any container) with each leaf ``x`` at path ``p`` replaced by ``fn(p, x)``."""
    return jax.tree_util.tree_map_with_path(lambda kp, x: fn(path_of(kp), x), tree)


def _leaf_masks(masks, what: str) -> dict[str, jax.Array]:
    if masks is None:
        return {}
    if not isinstance(masks, Mapping) and not hasattr(masks, "items"):
        raise TypeError(
            f"{what}: masks must be a params-shaped tree of bool arrays (None or absent where "
            f"dense), got {type(masks).__name__}"
        )
    return {p: jnp.asarray(m, bool) for p, m in flatten_paths(pure_params(masks)).items()}


def _check_masks(masks: Mapping[str, jax.Array], params, what: str) -> None:
    leaves = {p: jnp.shape(x) for p, x in flatten_paths(pure_params(params)).items()}
    for p, m in masks.items():
        if p not in leaves:
            layers = sorted(find_layers(unflatten_paths(leaves)))
            hint = (
                f"; {p!r} names a layer, not a leaf: masks are params-shaped trees "
                f"({{{p!r}: {{'kernel': mask}}}}; obcjax.training.mask_tree builds one)"
                if p in layers
                else ""
            )
            raise ValueError(f"{what}: mask for {p!r}, which is not a leaf of params{hint}")
        if tuple(m.shape) != tuple(leaves[p]):
            raise ValueError(
                f"{what}: mask of {p!r} has shape {tuple(m.shape)}, the param has "
                f"{tuple(leaves[p])}"
            )


def mask_tree(params, masks) -> dict:
    """The params-shaped mask tree (None where dense) of ``masks``.

    Args:
      params: the params the masks belong to (nested dicts or ``nnx.State``).
      masks: ``{layer path: kernel-shaped bool mask}`` (e.g. ``FITPlan.masks``), or already a
        params-shaped tree (returned as nested dicts).

    Returns:
      Nested dicts of params' structure: a bool array at every masked leaf, None elsewhere.

    Raises:
      ValueError: a path that is not a layer (or leaf) of ``params`` or a mask of the wrong shape.

    Example:
      >>> params = {"fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
      >>> tree = mask_tree(params, {"fc": jnp.eye(2, 3)})
      >>> tree["fc"]["bias"] is None, tree["fc"]["kernel"].dtype
      (True, dtype('bool'))
    """
    plain = pure_params(params)
    leaves = flatten_paths(plain)
    layers = find_layers(unflatten_paths(leaves))
    flat = {}
    for p, m in flatten_paths(pure_params(masks)).items():
        if p in layers and p not in leaves:
            flat[f"{p}/kernel" if p else "kernel"] = jnp.asarray(m).astype(bool)
        elif p in leaves:
            flat[p] = jnp.asarray(m).astype(bool)
        else:
            raise ValueError(f"mask_tree: layer {p!r} is not in params; layers: {sorted(layers)}")
    _check_masks(flat, plain, "mask_tree")
    return unflatten_paths({p: flat.get(p) for p in leaves})


def keep_mask(masks) -> optax.GradientTransformation:
    """Freeze every entry whose mask is False: ``u ← where(M, u, 0)``.

    The one mask transform (named so it does not shadow ``optax.masked``, which routes whole
    leaves to another transform). Chained last, ``optax.chain(optax.adamw(lr), keep_mask(m))``,
    a masked entry never moves: pruned weights stay exactly 0 and frozen quantized kernels stay
    exactly on their levels, whatever the optimizer's momentum or weight decay does. Start from
    params that are 0 where pruned (``compress``'s or ``hard_project``'s output).

    Args:
      masks: a params-shaped tree of bool arrays (True = trainable), None or absent where a leaf
        is free (e.g. ``Compressed.masks``, ``hard_project``'s masks, :func:`mask_tree`). Stored
        in the state as ``{leaf path: mask}``.

    Returns:
      An optax transform. Works on nested dicts, ``FrozenDict`` and ``nnx.State``, functionally
      and inside ``nnx.Optimizer``; ``init`` checks every mask against its param.

    Raises:
      ValueError (at ``init``): a mask whose path is not a leaf of params, or of the wrong shape.

    Example:
      >>> import optax
      >>> params = {"fc": {"kernel": jnp.array([[0.5, 0.0], [0.0, -0.5]]), "bias": jnp.ones(2)}}
      >>> tx = optax.chain(optax.adamw(1e-3), keep_mask({"fc": {"kernel": jnp.eye(2, dtype=bool)}}))
      >>> updates, _ = tx.update(params, tx.init(params), params)  # gradients = params here
      >>> optax.apply_updates(params, updates)["fc"]["kernel"] == 0
      Array([[False,  True],
             [ True, False]], dtype=bool)
    """
    flat = _leaf_masks(masks, "keep_mask")

    def init(params):
        _check_masks(flat, params, "keep_mask")
        return KeepMaskState(dict(flat))

    def update(updates, state, params=None):
        del params
        ms = state.masks

        def one(path, u):
            if path not in ms or u is None:
                return u
            return jnp.where(ms[path], u, jnp.zeros_like(u))

        return _map_leaves(one, updates), state

    return optax.GradientTransformation(init, update)


def frozen_codebooks(codebooks: Mapping[str, Codebook]) -> optax.GradientTransformation:
    """Identity on the updates; carries ``{layer path: Codebook}`` in the optimizer state.

    Keeping the codebooks in the state means one checkpoint of the optimizer state restores the
    whole compression module; nothing ever updates them. Container-agnostic (dicts, ``nnx.State``,
    ``nnx.Optimizer``).

    Example:
      >>> import optax
      >>> params = {"fc": {"kernel": jnp.ones((2, 2))}}
      >>> cbs = {"fc": Codebook(scale=jnp.array(0.1), zero=jnp.array(8.0), bits=4)}
      >>> tx = optax.chain(frozen_codebooks(cbs), optax.adam(1e-3))
      >>> get_codebooks(tx.init(params))["fc"].bits
      4
    """
    cbs = {
        p: Codebook(jnp.asarray(c.scale), jnp.asarray(c.zero), int(c.bits))
        for p, c in codebooks.items()
    }

    def init(params):
        layers = find_layers(unflatten_paths(flatten_paths(pure_params(params))))
        for p in cbs:
            if p not in layers:
                raise ValueError(
                    f"frozen_codebooks: codebook for {p!r}, which is not a layer of params "
                    f"({sorted(layers)})"
                )
        return CodebookState(dict(cbs))

    def update(updates, state, params=None):
        del params
        return updates, state

    return optax.GradientTransformation(init, update)


def _find(state, cls):
    found = []

    def visit(node):
        if isinstance(node, cls):
            found.append(node)
        elif isinstance(node, (tuple, list)):
            for x in node:
                visit(x)

    visit(state)
    return found


def get_codebooks(opt_state) -> dict[str, Codebook]:
    """The codebooks held by a :func:`frozen_codebooks` somewhere in ``opt_state`` ({} if none).

    ``opt_state`` may be a functional optax state or ``nnx.Optimizer.opt_state``.
    """
    found = _find(opt_state, CodebookState)
    return dict(pure_params(found[0].codebooks)) if found else {}


def get_masks(opt_state) -> dict | None:
    """The params-shaped mask tree (absent where dense) held by a :func:`keep_mask` in
    ``opt_state`` (None if none); ``opt_state`` may be ``nnx.Optimizer.opt_state``."""
    found = _find(opt_state, KeepMaskState)
    return unflatten_paths(dict(pure_params(found[0].masks))) if found else None


def codebooks_from_qarrays(qarrays: Mapping[str, list[QArray]]) -> dict[str, Codebook]:
    """Unified codebooks from ``Compressed.qarrays`` of tensor-granularity quantization.

    Raises:
      ValueError: a layer whose grid is not one scale/zero for the whole layer (per-channel or
        per-group grids, or several conv groups with different grids).
    """
    if any(isinstance(v, Mapping) for v in qarrays.values()):  # Compressed.qarrays (a tree)
        qarrays = {p: q for p, q in find_layers(qarrays).items() if q is not None}
    out = {}
    for p, qs in qarrays.items():
        qs = [qs] if isinstance(qs, QArray) else list(qs)
        s = np.concatenate([np.asarray(q.scale).ravel() for q in qs])
        z = np.concatenate([np.asarray(q.zero).ravel() for q in qs])
        if not (np.all(s == s[0]) and np.all(z == z[0])):
            raise ValueError(
                f"layer {p!r}: its grid has {len(np.unique(s))} distinct scales; a unified codebook "
                "needs Int(granularity='tensor') (one scale and zero point per layer)"
            )
        out[p] = Codebook(jnp.asarray(s[0]), jnp.asarray(z[0]), int(qs[0].bits))
    return out


def _fake_quant(w, cb: Codebook):
    q = quantize(w, cb.scale, cb.zero, cb.bits)
    return w + jax.lax.stop_gradient(q - w)  # STE: value q(w), gradient identity


def _on_grid(params, codebooks, masks, rounding, what: str):
    leaves = flatten_paths(pure_params(params))
    kernel_cb = {}
    for p, cb in codebooks.items():
        key = f"{p}/kernel" if p else "kernel"
        if key not in leaves:
            layers = sorted(find_layers(unflatten_paths(leaves)))
            raise ValueError(f"{what}: codebook for {p!r}, which is not a layer of params {layers}")
        kernel_cb[key] = cb
    ms = _leaf_masks(masks, what)

    def one(path, w):
        if path in kernel_cb:
            w = rounding(w, kernel_cb[path])
        if path in ms:
            w = jnp.where(ms[path], w, jnp.zeros_like(w))
        return w

    return _map_leaves(one, pure_params(params))


def fake_quantize_params(params, codebooks: Mapping[str, Codebook], masks=None):
    """Params whose kernels are ``M ⊙ Q(w)`` on the frozen grids, with STE gradients ``M``.

    Args:
      params: float "shadow" params (the trained copy): nested dicts or ``nnx.State``.
      codebooks: ``{layer path: Codebook}``; other layers pass through.
      masks: optional params-shaped bool tree (None or absent where dense), multiplied in so
        pruned weights stay 0 even if a shadow weight drifted.

    Returns:
      A params tree of the same structure, to feed the model's apply.

    Example:
      >>> p = {"fc": {"kernel": jnp.array([[0.76, -0.3]]), "bias": jnp.array([0.1])}}
      >>> cbs = {"fc": Codebook(scale=jnp.array(0.25), zero=jnp.array(8.0), bits=4)}
      >>> qp = fake_quantize_params(p, cbs)         # then model.apply({"params": qp}, x)
      >>> qp["fc"]["kernel"]
      Array([[ 0.75, -0.25]], dtype=float32)
      >>> g = jax.grad(lambda p: fake_quantize_params(p, cbs)["fc"]["kernel"].sum())(p)
      >>> g["fc"]["kernel"]
      Array([[1., 1.]], dtype=float32)
    """
    return _on_grid(params, codebooks, masks, _fake_quant, "fake_quantize_params")


def quantize_params(params, codebooks: Mapping[str, Codebook], masks=None):
    """Final compressed params: every kernel exactly on its frozen grid and zero where masked.

    Unlike :func:`fake_quantize_params` there is no straight-through expression
    ``w + (Q(w) - w)``, whose float value can land one ulp off the grid point ``Q(w)``.

    Example:
      >>> p = {"fc": {"kernel": jnp.array([[0.76, -0.3]])}}
      >>> cbs = {"fc": Codebook(scale=jnp.array(0.25), zero=jnp.array(8.0), bits=4)}
      >>> quantize_params(p, cbs, {"fc": {"kernel": jnp.array([[True, False]])}})["fc"]["kernel"]
      Array([[0.75, 0.  ]], dtype=float32)
    """
    out = _on_grid(
        params, codebooks, masks, lambda w, cb: quantize(w, cb.scale, cb.zero, cb.bits),
        "quantize_params",
    )  # fmt: skip
    return jax.lax.stop_gradient(out)


def _decay_kernels(params):
    return jax.tree.map(lambda x: jnp.ndim(x) > 1, params)


def _epochs(batches, steps: int | None, what: str):
    """Yield ``steps`` batches (one pass when None), re-iterating ``batches`` per epoch; a
    callable is called with the epoch number for each epoch's iterable."""
    epoch, done = 0, 0
    while True:
        it = batches(epoch) if callable(batches) else batches
        if epoch > 0 and not callable(batches) and iter(it) is it:
            raise ValueError(
                f"{what}: the batch iterator ran out after {done} of {steps} steps; pass a "
                "re-iterable (a list) or a callable epoch -> iterable"
            )
        got = 0
        for b in it:
            if steps is not None and done >= steps:
                return
            yield b
            got += 1
            done += 1
        if steps is None or done >= steps:
            return
        if got == 0:
            raise ValueError(f"{what}: batches is empty")
        epoch += 1


def finetune(
    loss_fn: Callable,
    params,
    batches: Iterable[Any] | Callable[[int], Iterable[Any]],
    steps: int | None = None,
    *,
    masks=None,
    codebooks: Mapping[str, Codebook] | None = None,
    model_state=None,
    tx: optax.GradientTransformation | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
):
    """Fine-tune float weights with masks and codebooks frozen (OPQ §3.4), on any model.

    Each step computes the loss on ``fake_quantize_params(params, codebooks, masks)`` (the frozen
    grids in value, straight-through gradients), steps ``optax.chain(frozen_codebooks, tx,
    keep_mask)`` and finally returns :func:`quantize_params` of the trained shadow weights.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``; with ``model_state`` (e.g. Linen
        ``batch_stats``): ``loss_fn(params, model_state, batch) -> (scalar, new_model_state)``.
        For an NNX model, ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)`` and a
        loss that calls ``nnx.merge(graphdef, params, rest)``.
      params: the starting shadow weights (nested dicts or ``nnx.State``), typically the
        compressed ones: then step 0 reproduces the compressed model exactly.
      batches: an iterable of batches (any pytree of arrays; re-iterated each epoch) or a
        callable ``epoch -> iterable`` (e.g. reshuffled per epoch).
      steps: optimizer steps (None: one pass over ``batches``).
      masks: params-shaped bool tree, None or absent where dense (e.g. ``Compressed.masks``;
        :func:`mask_tree` converts ``{layer path: mask}``).
      codebooks: ``{layer path: Codebook}`` (e.g. :func:`codebooks_from_qarrays`).
      model_state: optional non-trained state threaded through ``loss_fn``.
      tx: the optimizer; default AdamW at ``lr`` cosine-decayed to 0 over ``steps``,
        ``weight_decay`` on kernels (ndim > 1) only.

    Returns:
      ``(params, info)``: on-grid, masked params (same container as ``params``); info with
      ``losses`` (per step), ``seconds``, ``opt_state`` (holding the masks and codebooks),
      ``shadow_params`` and ``model_state``.

    Raises:
      ValueError: bad ``steps``, empty batches, a one-shot iterator that runs out, masks or
        codebooks that do not fit params.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> params = {"fc": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}}
      >>> keep = {"fc": {"kernel": jnp.abs(params["fc"]["kernel"]) > 0.5}}
      >>> data = [(rng.normal(size=(8, 4)), rng.normal(size=(8, 2))) for _ in range(3)]
      >>> def loss(p, batch):
      ...     x, y = batch
      ...     return jnp.mean((x @ p["fc"]["kernel"] - y) ** 2)
      >>> start = quantize_params(params, {}, keep)          # zero where pruned
      >>> new, info = finetune(loss, start, data, steps=6, masks=keep, lr=0.05)
      >>> bool(jnp.all(new["fc"]["kernel"][~keep["fc"]["kernel"]] == 0)), len(info["losses"])
      (True, 6)
    """
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"finetune: steps must be a non-negative int or None, got {steps!r}")
    if not callable(loss_fn):
        raise TypeError(f"finetune: loss_fn must be callable, got {type(loss_fn).__name__}")
    codebooks = dict(codebooks or {})
    if steps is None:
        if callable(batches):
            batches = list(batches(0))
        elif not hasattr(batches, "__len__"):
            batches = list(batches)
        steps = len(batches)
    if tx is None:
        tx = optax.adamw(
            optax.cosine_decay_schedule(lr, max(steps, 1)), weight_decay=weight_decay,
            mask=_decay_kernels,
        )  # fmt: skip
    params = pure_params(params)
    chain = optax.chain(frozen_codebooks(codebooks), tx, keep_mask(masks))
    state = chain.init(params)
    stateful = model_state is not None

    def objective(p, ms, cbs, mt, batch):
        qp = fake_quantize_params(p, cbs, mt)
        if stateful:
            return loss_fn(qp, ms, batch)
        return loss_fn(qp, batch), ms

    @jax.jit
    def step(p, ms, st, batch):
        (loss, ms), g = jax.value_and_grad(objective, has_aux=True)(
            p, ms, get_codebooks(st), get_masks(st), batch
        )
        u, st = chain.update(g, st, p)
        return optax.apply_updates(p, u), ms, st, loss

    losses = []
    t0 = time.perf_counter()
    for batch in _epochs(batches, steps, "finetune"):
        batch = jax.tree.map(jnp.asarray, batch)
        params, model_state, state, loss = step(params, model_state, state, batch)
        losses.append(float(loss))
    if steps and not losses:
        raise ValueError("finetune: batches is empty")
    out = quantize_params(params, get_codebooks(state), get_masks(state))
    info = {
        "losses": losses,
        "seconds": time.perf_counter() - t0,
        "opt_state": state,
        "shadow_params": params,
        "model_state": model_state,
    }
    return out, info
