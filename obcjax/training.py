"""Fine-tuning under frozen masks and frozen codebooks (optax transforms + a small driver).

OPQ (Hu et al., AAAI 2021) fixes every layer's pruning mask and quantization codebook in one shot
and then trains only the float weights: the forward pass sees ``ŵ = M ⊙ Q(w)`` on the frozen grid,
the backward pass uses the straight-through estimator ``∂ŵ/∂w = M``. Here:

* :func:`masked` -- an optax transform whose state holds the masks (so checkpoints of the optimizer
  state carry them, as in jaxpruner); it zeroes the updates of pruned weights and sets pruned
  weights to exactly 0 (the update is ``-w`` there), so weight decay or any earlier transform in
  the chain cannot resurrect them. Put it LAST in ``optax.chain``.
* :func:`frozen_codebooks` -- an identity transform whose state holds the codebooks
  (``{path: Codebook}``); :func:`get_codebooks` finds them in any (chained) optax state.
* :func:`quantized_apply` -- maps float "shadow" params to params whose kernels are
  ``M ⊙ Q(w)`` in value and ``M ⊙ w`` in gradient (STE); :func:`export` gives the final on-grid
  params.
* :func:`finetune` -- a jitted training loop for a zoo model with all of the above.

Example:
    >>> import optax
    >>> params = {"fc": {"kernel": jnp.array([[0.76, -0.49], [0.0, 1.3]]), "bias": jnp.zeros(2)}}
    >>> masks = {"fc": params["fc"]["kernel"] != 0}                 # e.g. Compressed.masks
    >>> cbs = {"fc": Codebook(scale=jnp.array(0.25), zero=jnp.array(8.0), bits=4)}
    >>> tx = optax.chain(optax.adam(1e-3), frozen_codebooks(cbs), masked(mask_tree(params, masks)))
    >>> state = tx.init(params)
    >>> qp = quantized_apply(params, get_codebooks(state), get_masks(state))  # STE forward
    >>> qp["fc"]["kernel"]                                          # on the frozen grid
    Array([[ 0.75, -0.5 ],
           [ 0.  ,  1.25]], dtype=float32)
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from obcjax.layout import set_path as _set_path
from obcjax.quant import QArray, quantize
from obcjax.transforms import find_layers

__all__ = [
    "Codebook",
    "MaskedState",
    "CodebookState",
    "masked",
    "frozen_codebooks",
    "get_codebooks",
    "get_masks",
    "mask_tree",
    "codebooks_from_qarrays",
    "quantized_apply",
    "export",
    "finetune",
]


class Codebook(NamedTuple):
    """One layer's frozen uniform grid ``scale * (clip(round(w/scale) + zero, 0, 2^bits-1) - zero)``.

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


class MaskedState(NamedTuple):
    """State of :func:`masked`: a params-shaped tree of bool masks (True = kept)."""

    masks: Any


class CodebookState(NamedTuple):
    """State of :func:`frozen_codebooks`: ``{path: Codebook}``."""

    codebooks: dict[str, Codebook]


def mask_tree(params, masks: Mapping[str, Any]):
    """Params-shaped bool tree from ``{layer path: kernel-shaped mask}``; everything else True.

    Raises:
      ValueError: a path that is not a layer of ``params`` or a mask of the wrong shape.

    Example:
      >>> params = {"fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
      >>> tree = mask_tree(params, {"fc": jnp.eye(2, 3)})      # e.g. Compressed.masks
      >>> tree["fc"]["bias"]
      Array([ True,  True,  True], dtype=bool)
    """
    layers = find_layers(params)
    tree = jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), params)
    for p, m in masks.items():
        if p not in layers:
            raise ValueError(f"mask_tree: layer {p!r} is not in params; layers: {sorted(layers)}")
        m = jnp.asarray(m).astype(bool)
        if m.shape != jnp.shape(layers[p]):
            raise ValueError(
                f"layer {p!r}: mask shape {m.shape} does not match the kernel "
                f"{tuple(jnp.shape(layers[p]))}"
            )
        tree = _set_path(tree, p, "kernel", m)
    return tree


def masked(masks) -> optax.GradientTransformation:
    """Keep pruned weights exactly zero: ``u ← where(M, u, -w)``.

    Args:
      masks: a params-shaped tree of bool arrays (see :func:`mask_tree`); stored in the state.

    Returns:
      An optax transform (needs ``params`` in ``update``). Chain it last.

    Example:
      >>> import optax
      >>> params = {"fc": {"kernel": jnp.array([[0.5, 0.0], [0.0, -0.5]])}}
      >>> tx = optax.chain(optax.adamw(1e-3), masked(mask_tree(params, {"fc": jnp.eye(2)})))
      >>> updates, _ = tx.update(params, tx.init(params), params)  # gradients = params here
      >>> optax.apply_updates(params, updates)["fc"]["kernel"] == 0
      Array([[False,  True],
             [ True, False]], dtype=bool)
    """
    masks = jax.tree.map(lambda m: jnp.asarray(m, bool), masks)

    def init(params):
        if jax.tree.structure(params) != jax.tree.structure(masks):
            raise ValueError(
                "masked: the mask tree does not have the structure of params; build it with "
                "obcjax.training.mask_tree(params, masks)"
            )
        return MaskedState(masks)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("masked: update needs params (to set pruned weights to exactly 0)")
        new = jax.tree.map(lambda u, m, p: jnp.where(m, u, -p), updates, state.masks, params)
        return new, state

    return optax.GradientTransformation(init, update)


def frozen_codebooks(codebooks: Mapping[str, Codebook]) -> optax.GradientTransformation:
    """Identity on the updates; carries ``{path: Codebook}`` in the optimizer state.

    Keeping the codebooks in the state means one checkpoint of the optimizer state restores the
    whole compression module; nothing ever updates them.

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
        del params
        return CodebookState(cbs)

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
    """The codebooks held by a :func:`frozen_codebooks` somewhere in ``opt_state`` ({} if none)."""
    found = _find(opt_state, CodebookState)
    return found[0].codebooks if found else {}


def get_masks(opt_state):
    """The mask tree held by a :func:`masked` somewhere in ``opt_state`` (None if none)."""
    found = _find(opt_state, MaskedState)
    return found[0].masks if found else None


def codebooks_from_qarrays(qarrays: Mapping[str, list[QArray]]) -> dict[str, Codebook]:
    """Unified codebooks from ``Compressed.qarrays`` of tensor-granularity quantization.

    Raises:
      ValueError: a layer whose grid is not one scale/zero for the whole layer (per-channel or
        per-group grids, or several conv groups with different grids).
    """
    out = {}
    for p, qs in qarrays.items():
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


def quantized_apply(params, codebooks: Mapping[str, Codebook], masks=None):
    """Params whose kernels are ``M ⊙ Q(w)`` on the frozen grids, with STE gradients ``M``.

    Args:
      params: float "shadow" params (the trained copy).
      codebooks: ``{layer path: Codebook}``; other layers pass through.
      masks: optional params-shaped bool tree (multiplied in, so pruned weights stay 0 even if a
        shadow weight drifted).

    Returns:
      A params tree of the same structure, to feed the model's apply.

    Example:
      >>> p = {"fc": {"kernel": jnp.array([[0.76, -0.3]]), "bias": jnp.array([0.1])}}
      >>> cbs = {"fc": Codebook(scale=jnp.array(0.25), zero=jnp.array(8.0), bits=4)}
      >>> qp = quantized_apply(p, cbs)            # then model.apply({"params": qp}, x)
      >>> qp["fc"]["kernel"]
      Array([[ 0.75, -0.25]], dtype=float32)
      >>> jax.grad(lambda p: quantized_apply(p, cbs)["fc"]["kernel"].sum())(p)["fc"]["kernel"]
      Array([[1., 1.]], dtype=float32)
    """
    out = params
    layers = find_layers(params)
    for p, cb in codebooks.items():
        if p not in layers:
            raise ValueError(f"quantized_apply: codebook for {p!r}, which is not a layer of params")
        out = _set_path(out, p, "kernel", _fake_quant(layers[p], cb))
    if masks is not None:
        out = jax.tree.map(lambda w, m: jnp.where(m, w, jnp.zeros_like(w)), out, masks)
    return out


def export(params, codebooks: Mapping[str, Codebook], masks=None):
    """Final compressed params: every kernel exactly on its frozen grid and zero where masked.

    Unlike :func:`quantized_apply` there is no straight-through expression ``w + (Q(w) - w)``,
    whose float value can land one ulp off the grid point ``Q(w)``.
    """
    out = params
    layers = find_layers(params)
    for p, cb in codebooks.items():
        if p not in layers:
            raise ValueError(f"export: codebook for {p!r}, which is not a layer of params")
        out = _set_path(out, p, "kernel", quantize(layers[p], cb.scale, cb.zero, cb.bits))
    if masks is not None:
        out = jax.tree.map(lambda w, m: jnp.where(m, w, jnp.zeros_like(w)), out, masks)
    return jax.lax.stop_gradient(out)


def _split_data(data):
    if isinstance(data, Mapping):
        if "train" not in data:
            raise ValueError("finetune: data must be a Split or a dict with a 'train' split")
        data = data["train"]
    x, y = data
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"finetune: data has {len(x)} inputs and {len(y)} labels")
    return np.asarray(x), np.asarray(y)


def finetune(
    name: str,
    variables: Mapping[str, Any],
    masks: Mapping[str, Any],
    codebooks: Mapping[str, Codebook],
    data,
    steps: int,
    *,
    lr: float = 1e-3,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    seed: int = 0,
):
    """Fine-tune a zoo model's float weights with masks and codebooks frozen (OPQ §3.4).

    Args:
      name: zoo model name (``obcjax.zoo.models``), e.g. ``"lenet5"``.
      variables: ``{"params", "batch_stats"}``; the params are the starting shadow weights
        (typically the compressed ones: then step 0 reproduces the compressed model exactly).
      masks: ``{layer path: kernel-shaped bool mask}`` (e.g. ``Compressed.masks``).
      codebooks: ``{layer path: Codebook}`` (e.g. :func:`codebooks_from_qarrays`).
      data: a ``Split`` ``(x, y)`` or a dict with a ``"train"`` split.
      steps: optimizer steps (batches drawn without replacement, reshuffled each epoch).
      lr: AdamW peak learning rate, cosine-decayed to 0. weight_decay: on kernels only.

    Returns:
      ``(variables, info)``: variables with the exported on-grid params (and the updated batch
      statistics); info with ``losses`` (per step), ``seconds``, ``opt_state`` (holding the masks
      and codebooks) and ``shadow_params``.

    Example:
      >>> from obcjax import zoo
      >>> variables = zoo.init_variables("lenet5", (8, 8, 1))
      >>> k = variables["params"]["fc3"]["kernel"]
      >>> masks = {"fc3": jnp.abs(k) > 0.05}          # usually Compressed.masks and
      >>> cbs = {"fc3": Codebook(jnp.abs(k).max() / 7, jnp.array(8.0), 4)}  # codebooks_from_qarrays
      >>> v, info = finetune(  # doctest: +SKIP
      ...     "lenet5", variables, masks, cbs, zoo.digits(), steps=200)
      >>> len(info["losses"])  # doctest: +SKIP
      200
    """
    from obcjax.zoo import models as zoo_models
    from obcjax.zoo import train as zoo_train

    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"finetune: steps must be a non-negative int, got {steps!r}")
    x, y = _split_data(data)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    mtree = mask_tree(params, masks)
    module = zoo_models.linen_model(name, zoo_models.num_classes_of(name, variables))
    opt = zoo_train.make_optimizer(lr, max(steps, 1), weight_decay)
    tx = optax.chain(frozen_codebooks(codebooks), opt, masked(mtree))
    state = tx.init(params)

    def loss_fn(p, bs, cbs, mt, xb, yb):
        qp = quantized_apply(p, cbs, mt)
        logits, upd = module.apply(
            {"params": qp, "batch_stats": bs}, xb, train=True, mutable=["batch_stats"]
        )
        return zoo_train.cross_entropy(logits, yb), upd.get("batch_stats", bs)

    @jax.jit
    def step(p, bs, st, xb, yb):
        (loss, bs), g = jax.value_and_grad(loss_fn, has_aux=True)(
            p, bs, get_codebooks(st), get_masks(st), xb, yb
        )
        u, st = tx.update(g, st, p)
        return optax.apply_updates(p, u), bs, st, loss

    rng = np.random.default_rng(seed)
    bsz = min(int(batch_size), len(y))
    order, pos, losses = rng.permutation(len(y)), 0, []
    t0 = time.perf_counter()
    for _ in range(steps):
        if pos + bsz > len(y):
            order, pos = rng.permutation(len(y)), 0
        idx = order[pos : pos + bsz]
        pos += bsz
        params, batch_stats, state, loss = step(
            params, batch_stats, state, jnp.asarray(x[idx]), jnp.asarray(y[idx])
        )
        losses.append(float(loss))
    out = export(params, get_codebooks(state), get_masks(state))
    info = {
        "losses": losses,
        "seconds": time.perf_counter() - t0,
        "opt_state": state,
        "shadow_params": params,
    }
    return {**variables, "params": out, "batch_stats": batch_stats}, info
