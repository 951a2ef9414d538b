"""Compress the layers of a Flax parameter pytree with the per-matrix solvers.

``compress(params, stats, rules)`` finds every layer (a dict holding a ``"kernel"``) under
``params``, picks a :class:`LayerSpec` for it by ordered regex rules on its '/'-joined path (first
match wins; a rule matching nothing is an error), maps its kernel to weight matrices, runs the
solver with the layer's Hessian, and maps the result back. Inputs are never mutated.

Kernel layout, in one place:

* Dense kernel ``(in, out)``: ``W = kernel.T``.
* Conv kernel ``(*spatial, in/G, out)`` (Flax HWIO): group ``g`` owns output channels
  ``g·out/G … (g+1)·out/G - 1`` and ``W_g = kernel[..., g-th slice].reshape(-1, out/G).T``, whose
  columns run ``(kh, kw, cin)`` -- the order of the calibration patches, and the order in which
  N:M groups run along input channels at a fixed spatial tap.

Example:
    >>> stats = calibrate(model, variables, batches)
    >>> out = compress(variables["params"], stats, [("conv1", None), (".*", LayerSpec(
    ...     prune=NM(2, 4), quant=Int(4)))])
    >>> logits = model.apply({**variables, "params": out.params}, x)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from obcjax import kernels as K
from obcjax.quant import QArray
from obcjax.specs import NM, Block, Int, Unstructured, check_fits, spec_name

__all__ = [
    "LayerSpec",
    "Compressed",
    "compress",
    "find_layers",
    "kernel_to_matrices",
    "matrices_to_kernel",
    "as_layer_spec",
    "summarize",
    "prune_levels",
]

SOLVERS = ("obc", "magnitude", "gptq")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What to do to one layer.

    Attributes:
      prune: ``Unstructured``, ``NM`` or ``Block`` (or None).
      quant: ``Int`` weight grid (or None).
      solver: ``"obc"`` (ExactOBS / OBQ, exact per row), ``"gptq"`` (GPTQ / SparseGPT, for wide
        layers) or ``"magnitude"`` (magnitude pruning / round-to-nearest baselines).
    """

    prune: Unstructured | NM | Block | None = None
    quant: Int | None = None
    solver: str = "obc"

    def __post_init__(self):
        if self.prune is not None and not isinstance(self.prune, (Unstructured, NM, Block)):
            raise TypeError(
                f"LayerSpec.prune must be Unstructured, NM or Block, got {self.prune!r}"
            )
        if self.quant is not None and not isinstance(self.quant, Int):
            raise TypeError(f"LayerSpec.quant must be Int, got {self.quant!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"LayerSpec.solver must be one of {SOLVERS}, got {self.solver!r}")
        if isinstance(self.prune, Block) and self.quant is not None:
            raise ValueError("LayerSpec: block pruning combined with quantization is not supported")

    @property
    def name(self) -> str:
        parts = [spec_name(s) for s in (self.prune, self.quant) if s is not None]
        return "+".join(parts) or "dense"


def as_layer_spec(value, solver: str = "obc") -> LayerSpec | None:
    """Normalise a rule value: a LayerSpec, a single spec, a ``(prune, quant)`` pair or None."""
    if value is None or isinstance(value, LayerSpec):
        return value
    if isinstance(value, (Unstructured, NM, Block)):
        return LayerSpec(prune=value, solver=solver)
    if isinstance(value, Int):
        return LayerSpec(quant=value, solver=solver)
    if isinstance(value, tuple) and len(value) == 2:
        return LayerSpec(prune=value[0], quant=value[1], solver=solver)
    raise TypeError(f"cannot interpret {value!r} as a layer spec")


class Compressed(NamedTuple):
    """Result of :func:`compress`; per-layer entries are keyed by the layer's '/'-joined path.

    Attributes:
      params: the new params pytree (same structure, dtypes and shapes as the input).
      masks: ``{path: bool kernel-shaped array}`` (True = kept) for pruned layers.
      qarrays: ``{path: [QArray per group]}`` for quantized layers.
      losses: ``{path: float}`` OBS loss ``0.5·tr(ΔW H ΔWᵀ)`` summed over the layer's groups.
      specs: ``{path: LayerSpec}`` of the compressed layers.
      summary: flat dict, see :func:`summarize`.
    """

    params: Any
    masks: dict[str, jax.Array]
    qarrays: dict[str, list[QArray]]
    losses: dict[str, float]
    specs: dict[str, LayerSpec]
    summary: dict[str, Any]


def find_layers(params) -> dict[str, jax.Array]:
    """``{path: kernel}`` for every dict under ``params`` that holds a ``"kernel"`` leaf."""
    out: dict[str, jax.Array] = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            if "kernel" in node and not isinstance(node["kernel"], Mapping):
                out["/".join(prefix)] = node["kernel"]
            for k, v in node.items():
                if isinstance(v, Mapping):
                    walk(v, prefix + (str(k),))

    walk(params, ())
    return out


def kernel_to_matrices(kernel, groups: int = 1) -> list[jax.Array]:
    """Weight matrices ``(out/G, cols)`` of a Dense ``(in, out)`` or conv ``(..., in/G, out)`` kernel."""
    kernel = jnp.asarray(kernel)
    out = kernel.shape[-1]
    if out % groups:
        raise ValueError(f"{out} output channels are not divisible into {groups} groups")
    og = out // groups
    return [kernel[..., g * og : (g + 1) * og].reshape(-1, og).T for g in range(groups)]


def matrices_to_kernel(mats: Sequence[jax.Array], shape, dtype=None) -> jax.Array:
    """Inverse of :func:`kernel_to_matrices`."""
    og = mats[0].shape[0]
    if len(mats) == 1:
        k = mats[0].T.reshape(*shape[:-1], og)
    else:
        # one stack + transpose instead of a concatenation of G parts: XLA compiles a
        # G-operand concatenate in minutes for depthwise layers with ~1000 channels; concrete
        # arrays are stacked on the host, which compiles nothing at all
        xp = jnp if any(isinstance(m, jax.core.Tracer) for m in mats) else np
        S = xp.stack([xp.asarray(m) for m in mats])  # (G, og, cols)
        k = jnp.asarray(xp.transpose(S, (2, 0, 1)).reshape(*shape[:-1], len(mats) * og))
    return k.astype(dtype) if dtype is not None else k


def _set_path(tree, path: str, key: str, value):
    """Functional update of ``tree[path...][key]`` on nested dicts (copies along the path)."""
    parts = path.split("/") if path else []

    def rec(node, i):
        node = dict(node)
        if i == len(parts):
            node[key] = value
        else:
            node[parts[i]] = rec(node[parts[i]], i + 1)
        return node

    return rec(tree, 0)


def _solve(W, H, spec: LayerSpec, *, rel_damp, method, layer) -> K.Result:
    p, q = spec.prune, spec.quant
    kw = dict(rel_damp=rel_damp, layer=layer)
    if p is not None:
        check_fits(p, W.shape[1], layer)
    if q is not None:
        check_fits(q, W.shape[1], layer)
    if spec.solver == "magnitude":
        if p is None:
            return K.rtn_quantize(W, q, H=H, **kw)
        if isinstance(p, Unstructured):
            r = K.magnitude_prune(W, p.sparsity, H=H, **kw)
        elif isinstance(p, NM):
            r = K.magnitude_nm(W, p.n, p.m, H=H, **kw)
        else:
            raise ValueError(f"layer {layer!r}: magnitude baseline has no block pruning")
        if q is None:
            return r
        rq = K.rtn_quantize(r.weights, q, H=H, **kw)
        P = K.prepare(W, H, **kw)
        Wq = jnp.where(r.mask, rq.weights, 0.0)
        loss = K.layer_loss(P.W, Wq, P.H)
        D = Wq - P.W
        row = 0.5 * jnp.sum(jnp.matmul(D, P.H, precision="highest") * D, axis=1)
        return K.Result(Wq, r.mask, rq.qarray, loss, row)
    if spec.solver == "gptq":
        if p is None:
            return K.gptq_quantize(W, H, q, **kw)
        if isinstance(p, Block):
            raise ValueError(f"layer {layer!r}: SparseGPT has no block pruning; use solver='obc'")
        return K.sparsegpt_prune(W, H, p, quant=q, **kw)
    kw["method"] = method
    if p is None:
        return K.obq_quantize(W, H, q, **kw)
    if q is not None:
        return K.obq_prune_quantize(W, H, p, q, **kw)
    if isinstance(p, Unstructured):
        return K.exactobs_prune(W, H, p.sparsity, **kw)
    if isinstance(p, NM):
        return K.exactobs_nm(W, H, p.n, p.m, **kw)
    return K.exactobs_block(W, H, p.sparsity, p.size, **kw)


def _hessians(state, layer: str):
    from obcjax.stats import hessian_finalize

    H = hessian_finalize(state)
    H = jnp.asarray(H)
    if H.ndim == 2:
        H = H[None]
    return H


def compress(
    params,
    stats: Mapping[str, Any],
    rules: Sequence[tuple[str, Any]] | Mapping[str, Any],
    *,
    rel_damp: float = 0.01,
    method: str = "auto",
    solver: str = "obc",
    progress: bool = False,
) -> Compressed:
    """Compress every layer of ``params`` chosen by ``rules``.

    Args:
      params: a Flax params pytree (nested dicts; the ``"params"`` collection).
      stats: ``{path: HessianState}`` from :func:`obcjax.calibration.calibrate`.
      rules: ordered ``(regex, spec)`` pairs (or a dict); ``spec`` is a :class:`LayerSpec`, a
        single spec, a ``(prune, quant)`` pair, or None to leave the layer alone.
      rel_damp: relative damping of every Hessian. method: ``"fast"`` or ``"naive"`` engine.
      solver: default solver for rule values that are not LayerSpecs.
      progress: show a tqdm bar over layers.

    Returns:
      A :class:`Compressed` record.
    """
    from obcjax.rules import match_rules

    if isinstance(rules, Mapping):
        rules = list(rules.items())
    layers = find_layers(params)
    if not layers:
        raise ValueError("compress: no layer with a 'kernel' was found in params")
    chosen = match_rules(list(layers), [(r, v) for r, v in rules], what="layer")
    specs = {p: as_layer_spec(v, solver) for p, v in chosen.items()}
    specs = {p: s for p, s in specs.items() if s is not None and (s.prune or s.quant)}
    missing = [p for p in specs if p not in stats]
    if missing:
        raise ValueError(
            f"compress: no calibration statistics for layer(s) {missing}; the statistics hold "
            f"{sorted(stats)} -- were they captured from this model?"
        )
    new_params = params
    masks, qarrays, losses = {}, {}, {}
    items = list(specs.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="compress", unit="layer")
    for path, spec in items:
        kernel = jnp.asarray(layers[path])
        H = _hessians(stats[path], path)
        G, cols = H.shape[0], H.shape[-1]
        mats = kernel_to_matrices(kernel, G) if kernel.shape[-1] % G == 0 else None
        if mats is None or mats[0].shape[1] != cols:
            raise ValueError(
                f"layer {path!r}: kernel of shape {tuple(kernel.shape)} does not match its "
                f"statistics ({G} group(s) of width {cols}); the statistics come from another model"
            )
        outs, ms, qs, loss = [], [], [], 0.0
        for g in range(G):
            name = path if G == 1 else f"{path}[group {g}]"
            r = _solve(
                mats[g].astype(jnp.float32),
                H[g],
                spec,
                rel_damp=rel_damp,
                method=method,
                layer=name,
            )
            outs.append(r.weights)
            ms.append(r.mask)
            qs.append(r.qarray)
            loss += float(r.loss)
        new_kernel = matrices_to_kernel(outs, kernel.shape, kernel.dtype)
        new_params = _set_path(new_params, path, "kernel", new_kernel)
        if spec.prune is not None:
            masks[path] = matrices_to_kernel([m.astype(jnp.float32) for m in ms], kernel.shape) > 0
        if spec.quant is not None:
            qarrays[path] = qs
        losses[path] = loss
    summary = summarize(params, new_params, specs, losses)
    return Compressed(new_params, masks, qarrays, losses, specs, summary)


def summarize(params, new_params, specs: Mapping[str, LayerSpec], losses=None) -> dict[str, Any]:
    """Flat '/'-keyed summary: per layer size, sparsity, bits, theoretical bits and loss; totals.

    The theoretical size of a layer counts its kept weights at their bit-width (32 when not
    quantized), the cost model of OBC; biases and other leaves count at 32 bits.
    """
    losses = losses or {}
    new = find_layers(new_params)
    out: dict[str, Any] = {}
    total_params = 0
    dense_bits = 0
    comp_bits = 0
    for path, k in new.items():
        kn = np.asarray(k)
        n = kn.size
        spec = specs.get(path)
        bits = spec.quant.bits if (spec is not None and spec.quant is not None) else 32
        nz = int(np.count_nonzero(kn)) if (spec is not None and spec.prune is not None) else n
        out[f"{path}/params"] = n
        out[f"{path}/sparsity"] = 1.0 - nz / n
        out[f"{path}/bits"] = bits
        out[f"{path}/size_bits"] = nz * bits
        out[f"{path}/spec"] = spec.name if spec is not None else "dense"
        if path in losses:
            out[f"{path}/loss"] = float(losses[path])
        total_params += n
        dense_bits += 32 * n
        comp_bits += nz * bits
    other = sum(np.size(x) for x in jax.tree.leaves(new_params)) - total_params
    out["total/params"] = total_params + other
    out["total/dense_bits"] = dense_bits + 32 * other
    out["total/size_bits"] = comp_bits + 32 * other
    out["total/compression"] = out["total/dense_bits"] / max(out["total/size_bits"], 1)
    out["total/loss"] = float(sum(losses.values()))
    return out


def prune_levels(
    params,
    stats: Mapping[str, Any],
    sparsities: Sequence[float],
    *,
    rules: Sequence[tuple[str, Any]] = ((".*", True),),
    solver: str = "obc",
    rel_damp: float = 0.01,
    method: str = "auto",
) -> list[Any]:
    """Params pruned to each of several unstructured sparsities, one elimination pass per layer.

    OBC's database idea: ExactOBS eliminates every row once and any number of levels is rebuilt
    from the recorded orders, so a whole sweep costs little more than one level.

    Args:
      rules: which layers to prune (a value of None leaves a layer dense).
      solver: ``"obc"`` (ExactOBS) or ``"magnitude"``.

    Returns:
      One params pytree per sparsity.
    """
    from obcjax.rules import match_rules

    layers = find_layers(params)
    chosen = {p: v for p, v in match_rules(list(layers), list(rules), what="layer").items()
              if v is not None}
    out = [params for _ in sparsities]
    for path in chosen:
        kernel = jnp.asarray(layers[path])
        H = _hessians(stats[path], path)
        G = H.shape[0]
        mats = kernel_to_matrices(kernel, G)
        per_level = [[] for _ in sparsities]
        for g in range(G):
            W = mats[g].astype(jnp.float32)
            if solver == "obc":
                r = K.exactobs_prune(W, H[g], list(sparsities), rel_damp=rel_damp, method=method,
                                     layer=path)
                ws = list(r.weights)
            elif solver == "magnitude":
                ws = [K.magnitude_prune(W, s, layer=path).weights for s in sparsities]
            else:
                raise ValueError(f"prune_levels: solver must be 'obc' or 'magnitude', got {solver!r}")
            for l, w in enumerate(ws):
                per_level[l].append(w)
        for l in range(len(sparsities)):
            k = matrices_to_kernel(per_level[l], kernel.shape, kernel.dtype)
            out[l] = _set_path(out[l], path, "kernel", k)
    return out
