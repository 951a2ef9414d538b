"""Argument checks shared by the public entry points (compress, prune_levels, the database).

Each check runs on the host before any work and raises a ``ValueError`` / ``TypeError`` whose
message names the entry point, the argument (and the layer where there is one), what was expected
and what was given. The pure cores (the solvers under ``jit`` / ``vmap``) never call these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "describe",
    "check_rules",
    "check_rel_damp",
    "check_kernel",
    "sparsity_list",
    "rule_spec",
]


def describe(value: Any) -> str:
    """A short description of a given value for error messages: its type, and its shape or
    value."""
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and hasattr(value, "dtype"):
        if shape == ():
            try:
                return f"a 0-d array {np.asarray(value).item()!r}"
            except Exception:  # a tracer has no value
                return f"a 0-d array ({value.dtype})"
        return f"an array of shape {shape} ({value.dtype})"
    if isinstance(value, Mapping):
        keys = sorted(map(str, value))
        return f"a {type(value).__name__} with keys {keys[:6]}{' ...' if len(keys) > 6 else ''}"
    if isinstance(value, list | tuple):
        return f"a {type(value).__name__} of length {len(value)}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def check_rules(rules, what: str, value: str = "spec") -> list[tuple[Any, Any]]:
    """``rules`` as a list of ``(regex, value)`` pairs, once it is known to be a mapping
    ``{regex: value}`` or an iterable of such pairs (a generator is read once, here)."""
    if isinstance(rules, Mapping):
        return list(rules.items())
    if not isinstance(rules, str | bytes) and hasattr(rules, "__iter__"):
        rules = list(rules)
        for i, rule in enumerate(rules):
            if not (isinstance(rule, tuple | list) and len(rule) == 2):
                raise TypeError(
                    f"{what}: rules[{i}] must be a (regex, {value}) pair, got {describe(rule)}"
                )
        return [tuple(rule) for rule in rules]
    raise TypeError(
        f"{what}: rules must be a list of (regex, {value}) pairs or a dict {{regex: {value}}}, "
        f"got {describe(rules)}"
    )


def check_rel_damp(rel_damp, what: str) -> float:
    """``rel_damp`` as a float once it is a finite number >= 0."""
    if isinstance(rel_damp, bool) or not isinstance(rel_damp, int | float | np.integer | np.floating):
        if not (hasattr(rel_damp, "shape") and getattr(rel_damp, "shape", None) == ()):
            raise TypeError(
                f"{what}: rel_damp must be a finite number >= 0 (e.g. 0.01), got "
                f"{describe(rel_damp)}"
            )
    value = float(rel_damp)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{what}: rel_damp must be a finite number >= 0 (e.g. 0.01), got {value!r}")
    return value


def check_kernel(path: str, kernel, what: str) -> None:
    """A layer's kernel must be a non-empty real array with at least two axes."""
    dtype = getattr(kernel, "dtype", None)
    if dtype is None:
        raise TypeError(
            f"{what}: layer {path!r}: kernel must be an array, got {describe(kernel)}"
        )
    if not (np.issubdtype(np.dtype(dtype), np.floating) or str(dtype) == "bfloat16"):
        raise TypeError(
            f"{what}: layer {path!r}: kernel must be a floating-point array, got dtype {dtype}"
        )
    shape = tuple(kernel.shape)
    if len(shape) < 2:
        raise ValueError(
            f"{what}: layer {path!r}: kernel must have at least 2 axes ((in, out) or "
            f"(*spatial, in, out)), got shape {shape}"
        )
    if 0 in shape:
        raise ValueError(
            f"{what}: layer {path!r}: kernel is empty (shape {shape}); a layer with no weights has "
            "nothing to compress -- leave it out with a (regex, None) rule"
        )


def sparsity_list(sparsities, what: str, arg: str = "sparsities") -> tuple[float, ...]:
    """A non-empty list of unstructured sparsities in ``[0, 1)`` (shorthands ``"50%"`` read as
    :func:`obcjax.specs.as_prune` reads them)."""
    from obcjax.specs import Unstructured, as_prune

    scalar = (
        isinstance(sparsities, str | bytes | int | float)
        or getattr(sparsities, "shape", None) == ()
        or sparsities is None
        or not hasattr(sparsities, "__iter__")
    )
    if scalar:
        raise TypeError(
            f"{what}: {arg} must be a list of unstructured sparsities in [0, 1) (e.g. [0.5, 0.7]), "
            f"got {describe(sparsities)}; wrap a single level in a list"
        )
    if isinstance(sparsities, Mapping | set | frozenset):  # no order: the levels would shuffle
        raise TypeError(
            f"{what}: {arg} must be a list of unstructured sparsities in [0, 1), got "
            f"{describe(sparsities)}"
        )
    items = list(np.asarray(sparsities).tolist()) if hasattr(sparsities, "shape") else list(
        sparsities
    )
    if not items:
        raise ValueError(f"{what}: {arg} is empty; give at least one sparsity in [0, 1)")
    out = []
    for i, s in enumerate(items):
        try:
            spec = as_prune(s, what=f"{arg}[{i}]")
        except (TypeError, ValueError) as e:
            raise type(e)(f"{what}: {e}") from None
        if not isinstance(spec, Unstructured):
            raise ValueError(
                f"{what}: {arg}[{i}]: expected an unstructured sparsity in [0, 1) (0.5, '50%'), "
                f"got {s!r} ({type(spec).__name__ if spec is not None else 'nothing'}); "
                f"{what} builds unstructured levels only"
            )
        out.append(spec.sparsity)
    return tuple(out)


def rule_spec(value, solver, path: str, what: str):
    """``as_layer_spec(value, solver)`` with an error that names the layer and the rule value."""
    from obcjax.transforms import as_layer_spec

    try:
        return as_layer_spec(value, solver)
    except (TypeError, ValueError) as e:
        raise type(e)(
            f"{what}: layer {path!r}: the rule value {describe(value)} is not a layer spec "
            f"(a LayerSpec, Unstructured / NM / Block / Int, a (prune, quant) pair, or None): {e}"
        ) from None
