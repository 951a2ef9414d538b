"""Command line: ``obcjax compress`` (and ``obcjax evaluate``, ``obcjax train``).

``obcjax compress`` with no arguments is the built-in default: LeNet-5 trained on scikit-learn's
bundled digits (trained in seconds the first time, then cached), calibrated on the calibration
split, compressed with OBC (ExactOBS 50% unstructured + OBQ 4-bit, jointly) next to the
magnitude + round-to-nearest baseline at the same target; it prints a before/after table and a
per-layer table, sweeps sparsity for a plot of accuracy against compression, and writes
``summary.json`` and ``accuracy_vs_sparsity.png`` to ``--out``.

``--model package.module:factory`` compresses a model of your own, Linen or NNX: ``factory()``
returns ``(model, variables, batches)`` or ``(model, variables, batches, evaluate)``; the
contract is :func:`load_user_model`'s (and ``obcjax compress --help``'s). The zoo models need
the zoo extra; without it the command says so in one line (``pip install obcjax[zoo]``, exit
status 1); ``--sweep`` without matplotlib is refused up front (``obcjax[plots]``, exit status 2).

Every option is checked before any work starts (training, calibration, compression): a bad
value is one line on stderr that names the option and the form it accepts, with exit status 2
and no traceback (``--debug`` shows the traceback of such errors too). The output folder is made
only once the options are valid, and is removed again if the run fails before writing into it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from obcjax.specs import NM, SOLVER_NAMES, Int, Unstructured

# the solver names, defined once in obcjax.specs (which imports no JAX, so neither does reading
# the options)
SOLVERS = SOLVER_NAMES
_NONE = ("none", "dense")


class UsageError(Exception):
    """A bad option value: printed as one line ``obcjax: error: <flag>: <message>``, exit 2."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def _one_line(message: str) -> str:
    # argparse says "argument --prune: ..."; the flag alone reads better
    message = re.sub(r"^argument ([^:]+): ", r"\1: ", str(message))
    return " ".join(message.split())


def _usage_exit(message: str):
    sys.stderr.write(f"obcjax: error: {_one_line(message)}\n")
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block) and exit status 2."""

    def error(self, message):  # noqa: D102 - argparse's hook
        _usage_exit(message)


# ----------------------------------------------------------------------------------------------
# Option values: argparse ``type=`` converters (ArgumentTypeError names the accepted form)
# ----------------------------------------------------------------------------------------------


def _parse_prune(text: str | None):
    """``"0.5"``/``"50%"`` -> Unstructured, ``"2:4"`` -> NM, ``"none"``/``"0"`` -> None.

    Raises ValueError or TypeError for anything else (an N:M pattern needs 0 < N < M).
    """
    if text is None:
        return None
    text = str(text).strip()
    if text.lower() in (*_NONE, "0"):
        return None
    if ":" in text:
        n, m = text.split(":")  # "2:4:8" fails here
        return NM(int(n), int(m))
    if text.endswith("%"):
        return Unstructured(float(text[:-1]) / 100)
    return Unstructured(float(text))


PRUNE_FORM = ("a sparsity in [0, 1) such as 0.5 (or 50%), an N:M pattern with 0 < N < M such as "
              "2:4, or none")


def _prune_arg(text: str):
    try:
        return _parse_prune(text)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"expected {PRUNE_FORM}; got {text!r}") from None


def _parse_bits(text: str | None) -> int | None:
    """``"4"`` -> 4; ``"none"``/``"32"``/``"0"`` -> None. ValueError outside 2..8."""
    if text is None or str(text).strip().lower() in (*_NONE, "32", "0"):
        return None
    bits = int(str(text).strip())
    if not 2 <= bits <= 8:
        raise ValueError(f"bits {bits} outside 2..8")
    return bits


def _wbits_arg(text: str) -> int | None:
    try:
        return _parse_bits(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer number of weight bits 2..8, or none; got {text!r}") from None


def _int_arg(minimum: int, what: str):
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}")
        return value

    return convert


def _rel_damp_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(
            f"expected a number >= 0 (damping relative to the mean Hessian diagonal, e.g. 0.01); "
            f"got {text!r}")
    return value


def _solvers_arg(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",")]
    bad = [s for s in items if s not in SOLVERS]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of {', '.join(SOLVERS)}; got {text!r}")
    return list(dict.fromkeys(items))


def _regex_arg(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(
            f"expected a regular expression for layer paths (whole path, re.fullmatch), such as "
            f"fc3 or 'block.*'; got {text!r} ({e})") from None
    return text


def _sweep_arg(text: str) -> list[float]:
    if text.strip().lower() in ("", *_NONE):
        return []
    form = f"a comma list of sparsities in [0, 1) such as 0.5,0.7,0.9, or '' to skip; got {text!r}"
    levels = []
    for item in text.split(","):
        try:
            levels.append(Unstructured(float(item)).sparsity)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"expected {form}") from None
    return levels


@dataclasses.dataclass(frozen=True)
class Budget:
    """A parsed ``--budget``: the metric and the reduction factor against dense."""

    text: str
    metric: str
    factor: float

    def __str__(self):
        return self.text


def _parse_budget(text: str) -> Budget:
    form = (f"expected a reduction factor >= 1 against dense, optionally after a metric size, bops "
            f"or flops: 16x, size=16x, bops=8x or flops=2x; got {text!r}")
    metric, _, value = text.strip().lower().rpartition("=")
    metric = metric or "size"
    from obcjax.sizes import as_ratio  # the one form of a ratio target: 16 or 16x

    try:
        factor = as_ratio(value)
    except ValueError:
        factor = math.nan
    if metric not in ("size", "bops", "flops") or not (math.isfinite(factor) and factor >= 1):
        raise argparse.ArgumentTypeError(form)
    return Budget(text, metric, factor)


@dataclasses.dataclass(frozen=True)
class ABits:
    """A parsed ``--abits``: one width (BOPs count only) or a list (activations quantized)."""

    text: str
    widths: tuple[int, ...]
    mixed: bool

    def __str__(self):
        return self.text


def _abits_arg(text: str) -> ABits:
    mixed = "," in text
    form = ("expected activation bits: one integer 1..32 (the width in the BOPs count), or a "
            f"comma list of integers 4..8 such as 4,8 (activations quantized); got {text!r}")
    try:
        widths = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(form) from None
    lo, hi = (4, 8) if mixed else (1, 32)
    if not all(lo <= b <= hi for b in widths):
        raise argparse.ArgumentTypeError(form)
    return ABits(text, tuple(sorted(set(widths), reverse=True)), mixed)


# one weight-only database level: none, 0.5, 2:4, w4, 0.5+w4, 2:4+w4
_MIXED_LEVEL = re.compile(r"^(?:[^+]+\+)?\d+w\d+a$")
LEVELS_FORM = ("a comma list of levels such as none,0.5,0.9,w4,0.5+w4,2:4+w4 (with a list of "
               "--abits: 8w8a,4w4a,2:4+8w8a,...)")


def _weight_level(text: str):
    """``(prune, bits)`` of a weight-only database level: ``none``, ``0.5``, ``2:4``, ``w4``,
    ``0.5+w4``, ``2:4+w4``; ValueError or TypeError for anything else."""
    if text.strip().lower() == "none":
        return None, None
    parts = text.split("+")
    widths = [p for p in parts if p.startswith("w")]
    prunes = [p for p in parts if not p.startswith("w")]
    if len(widths) > 1 or len(prunes) > 1:
        raise ValueError(f"one pruning part and one width at most: {text!r}")
    prune = _parse_prune(prunes[0]) if prunes else None
    bits = _parse_bits(widths[0][1:]) if widths else None
    if (prunes and prune is None) or (widths and bits is None):
        raise ValueError(f"'none' inside {text!r}")
    return prune, bits


def _parse_level(text: str):
    """A weight-only database level as a ``LayerSpec`` (None for ``none``)."""
    from obcjax.transforms import LayerSpec

    prune, bits = _weight_level(text)
    if prune is None and bits is None:
        return None
    return LayerSpec(prune=prune, quant=Int(bits) if bits else None)


def _levels_arg(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    for item in items:
        if _MIXED_LEVEL.match(item.lower()):
            continue
        try:
            _weight_level(item)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(
                f"expected {LEVELS_FORM}; got {item!r}" + (f" in {text!r}" if item != text else "")
            ) from None
    return items


BUDGET_LEVELS = ("none", "0.5", "0.6", "0.7", "0.8", "0.9", "0.95", "w8", "w4", "w3", "w2",
                 "0.5+w4", "0.5+w3", "0.7+w4", "0.7+w3", "0.8+w4", "2:4+w4")


# ----------------------------------------------------------------------------------------------
# Checks that need the zoo or the file system (still before any work)
# ----------------------------------------------------------------------------------------------


def _check_model_data(model: str, data: str | None, *, cmd: str) -> tuple[str, str | None]:
    """The model and data set names, checked; for compress/train the pair needs a recipe, and a
    missing ``--data`` is the model's own data set (digits where it has a recipe)."""
    from obcjax.zoo import data as zdata
    from obcjax.zoo import models as zmodels

    names = list(zmodels.MODEL_NAMES) + (["minilm"] if cmd == "compress" else [])
    if model not in names:
        raise UsageError("--model", f"expected one of {', '.join(names)}; got {model!r}")
    if data is not None and data not in zdata.DATASET_NAMES:
        raise UsageError("--data", f"expected one of {', '.join(zdata.DATASET_NAMES)}; got {data!r}")
    if cmd == "evaluate":
        return model, data
    from obcjax.zoo import train as ztrain

    known = [d for m, d in ztrain.DEFAULT_CONFIGS if m == model]
    if not known:
        raise UsageError("--model", f"{model!r} has no training recipe")
    if data is None:
        return model, "digits" if "digits" in known else known[0]
    if data not in known:
        raise UsageError("--data", f"model {model} is trained on {' or '.join(known)}; got {data!r}")
    return model, data


# ``--model package.module:factory``: a model of the user's, next to the zoo names
_USER_MODEL = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
USER_MODEL_FORM = ("package.module:factory, a function of no arguments returning (model, "
                   "variables, batches) or (model, variables, batches, evaluate)")
# every layer type with a kernel that calibration captures (attention projections included)
USER_LAYER_TYPES = ("Dense", "Conv", "DenseGeneral")


def is_user_model(name: str | None) -> bool:
    """Whether a ``--model`` value names a factory (``package.module:factory``), not a zoo model."""
    return name is not None and ":" in name


@dataclasses.dataclass
class UserModel:
    """What a ``--model package.module:factory`` gave, checked.

    Attributes:
      name: the ``--model`` value.
      model: the ``flax.linen.Module`` or ``flax.nnx.Module``.
      variables: Linen: the variable dict; NNX: the ``nnx.State`` of the whole model (the
        factory's variables applied over a copy of the model's own state).
      params: the params as the solvers take them (Linen ``variables["params"]``; NNX the pure
        dict of the ``nnx.Param`` state).
      batches: the calibration batches, as a list.
      evaluate: ``evaluate(variables) -> float`` or None.
    """

    name: str
    model: object
    variables: object
    params: dict
    batches: list
    evaluate: object

    @property
    def is_nnx(self) -> bool:
        from flax import nnx

        return isinstance(self.model, nnx.Module)

    def with_params(self, params):
        """The variables with ``params`` in place of the model's params (the form ``evaluate``
        takes): Linen a variable dict, NNX an ``nnx.State`` of the whole model."""
        if not self.is_nnx:
            return {**self.variables, "params": params}
        from obcjax.capture import BoundModel

        return BoundModel(self._nnx_module(self.variables), params).variables

    def saved_tree(self, variables) -> dict:
        """What ``--save`` writes: the Linen variable dict, or the NNX params (pure dict)."""
        if not self.is_nnx:
            return dict(variables)
        from flax import nnx

        return nnx.to_pure_dict(nnx.state(self._nnx_module(variables), nnx.Param))

    def _nnx_module(self, state):
        from flax import nnx

        return nnx.merge(nnx.graphdef(self.model), state)


def load_user_model(spec: str, flag: str = "--model") -> UserModel:
    """Import ``package.module``, call ``factory()`` and check what it returns.

    The factory is the command line's whole view of a user's model. It takes no arguments and
    returns ``(model, variables, batches)`` or ``(model, variables, batches, evaluate)``:

    * ``model``: a ``flax.linen.Module`` (run as ``model.apply(variables, x)``) or a
      ``flax.nnx.Module`` (run as ``model(x)``; put it in evaluation mode, ``model.eval()``,
      if it has dropout or batch norm). Every ``Dense`` / ``Conv`` / ``DenseGeneral`` layer
      (``nnx.Linear`` / ``nnx.Conv`` / ``nnx.LinearGeneral``) the forward pass calls is
      compressed, except those ``--keep`` (and ``--keep-first``) leave dense.
    * ``variables``: Linen: the variable dict (``{"params": ..., "batch_stats": ...}``, every
      collection the model reads). NNX: None (the model's own state), or an ``nnx.State`` / pure
      dict applied over it.
    * ``batches``: an iterable of calibration batches (read once, kept as a list): an array, a
      tuple/list whose first element is the input, or a dict with an ``"x"`` entry.
    * ``evaluate`` (optional): ``evaluate(variables) -> float``, the model's accuracy in
      ``[0, 1]`` (any score where higher is better is shown the same way, times 100), given the
      variables in the form above with the compressed params in place: Linen a variable dict,
      NNX an ``nnx.State`` of the whole model (``nnx.update(model, state)``). Without it the
      tables show no accuracy and ``--sweep`` is skipped.

    The current folder is put on ``sys.path`` first (as ``python -m`` does), so a module next to
    where the command runs is found.

    Raises:
      UsageError: a malformed value, a module that cannot be imported, a missing or
        uncallable factory, a factory that fails, or a result that breaks the contract above.
    """
    if not _USER_MODEL.match(spec):
        raise UsageError(flag, f"expected a zoo model name or {USER_MODEL_FORM}; got {spec!r}")
    modname, _, fname = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        raise UsageError(flag, f"cannot import {modname!r} ({e}); expected {USER_MODEL_FORM} "
                               f"with the module importable from the current folder or "
                               f"PYTHONPATH") from e
    except Exception as e:
        raise UsageError(flag, f"importing {modname!r} failed: {type(e).__name__}: {e}") from e
    factory = getattr(module, fname, None)
    if factory is None:
        raise UsageError(flag, f"module {modname!r} has no {fname!r}; expected {USER_MODEL_FORM}")
    if not callable(factory):
        raise UsageError(flag, f"{spec} is a {type(factory).__name__}, not a function; expected "
                               f"{USER_MODEL_FORM}")
    try:
        got = factory()
    except Exception as e:
        raise UsageError(flag, f"{spec}() failed: {type(e).__name__}: {e}") from e
    if not (isinstance(got, tuple | list) and len(got) in (3, 4)):
        what = f"a {len(got)}-tuple" if isinstance(got, tuple | list) else type(got).__name__
        raise UsageError(flag, f"{spec}() returned {what}; expected (model, variables, batches) "
                               f"or (model, variables, batches, evaluate)")
    model, variables, batches, evaluate = (*got, None) if len(got) == 3 else got
    import flax.linen as nn
    from flax import nnx

    from obcjax.capture import BoundModel

    if not isinstance(model, nn.Module | nnx.Module):
        raise UsageError(flag, f"{spec}(): the model must be a flax.linen.Module or a "
                               f"flax.nnx.Module, got {type(model).__name__}")
    if isinstance(model, nn.Module) and not (isinstance(variables, dict) and "params" in variables):
        raise UsageError(flag, f"{spec}(): a Linen model's variables must be a dict with a "
                               f"'params' entry, as model.init returns; got "
                               f"{type(variables).__name__}")
    try:
        bound = BoundModel(model, variables, what=f"{spec}()")
    except (TypeError, ValueError) as e:
        raise UsageError(flag, str(e)) from e
    if evaluate is not None and not callable(evaluate):
        raise UsageError(flag, f"{spec}(): evaluate must be a function of the variables, got "
                               f"{type(evaluate).__name__}")
    try:
        batches = list(batches)
    except TypeError as e:
        raise UsageError(flag, f"{spec}(): batches must be an iterable of batches, got "
                               f"{type(batches).__name__}") from e
    if not batches:
        raise UsageError(flag, f"{spec}(): batches is empty; give at least one calibration batch")
    if bound.is_nnx:
        params = nnx.to_pure_dict(nnx.state(bound.module(), nnx.Param))
    else:
        params = variables["params"]
    return UserModel(spec, model, bound.variables, params, batches, evaluate)


def _batch_input(batch):
    if isinstance(batch, dict):
        return batch["x"]
    if isinstance(batch, tuple | list):
        return batch[0]
    return batch


@dataclasses.dataclass
class _Layers:
    """A model's compressible layers: paths in forward order, input widths (the columns of each
    layer's matrix), and for a zoo model the variables' shapes (``jax.ShapeDtypeStruct``
    leaves)."""

    order: list[str]
    cols: dict[str, int]
    abstract: dict | None = None


def _user_layers(user: UserModel) -> _Layers:
    """The layers a user's model calls on its first batch, traced (``jax.eval_shape``: nothing
    is computed or compiled); a forward pass that fails is a ``--model`` error."""
    import jax

    from obcjax.capture import BoundModel, layer_rows

    cols: dict[str, int] = {}

    def hook(call, proceed):
        if call.path not in cols:
            cols[call.path] = int(layer_rows(call.kind, call.module, call.input, call.path)
                                  .shape[-1])
        return proceed(*call.args, **call.kwargs)

    bound = BoundModel(user.model, user.variables, what=user.name)
    x = _batch_input(user.batches[0])
    try:
        jax.eval_shape(lambda v: bound.run(lambda m, x: m(x), x, variables=v, hook=hook,
                                           layer_types=USER_LAYER_TYPES), bound.variables)
    except Exception as e:
        raise UsageError("--model", f"{user.name}(): the model does not run on its first batch "
                                    f"({type(e).__name__}: {_one_line(str(e))[:300]})") from e
    if not cols:
        raise UsageError("--model", f"{user.name}(): the forward pass calls no Dense, Conv or "
                                    f"DenseGeneral layer; nothing to compress")
    return _Layers(list(cols), cols)


def _zoo_layers(model: str, ds) -> _Layers:
    # shapes only (jax.eval_shape): nothing is trained, initialised on device or compiled
    import flax.linen as nn
    import jax

    from obcjax.zoo import models as zmodels

    shape = tuple(ds["train"].x.shape[1:])
    classes = int(ds["train"].y.max()) + 1
    abstract = jax.eval_shape(
        lambda: zmodels.init_variables(model, shape, num_classes=classes, seed=0))
    module = zmodels.linen_model(model, num_classes=classes)
    order: list[str] = []

    def spy(f, a, kw, context):
        if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Conv)):
            order.append("/".join(context.module.path))
        return f(*a, **kw)

    x = jax.ShapeDtypeStruct((1, *shape), ds["train"].x.dtype)
    with nn.intercept_methods(spy):
        jax.eval_shape(lambda v, x: module.apply(v, x, train=False), abstract, x)
    order = list(dict.fromkeys(order))
    cols = {}
    for p in order:
        node = abstract["params"]
        for k in p.split("/"):
            node = node[k]
        cols[p] = math.prod(node["kernel"].shape[:-1])
    return _Layers(order, cols, abstract)


def _missing_dirs(flag: str, path: Path) -> list[Path]:
    """The folders that writing into ``path`` (a folder) would create, deepest first; raises
    UsageError if the nearest existing one is a file or not writable."""
    missing, q = [], path
    while not q.exists() and q != q.parent:
        missing.append(q)
        q = q.parent
    if q.exists() and not q.is_dir():
        raise UsageError(flag, f"expected a folder; {str(q)!r} is a file")
    if not os.access(q, os.W_OK | os.X_OK):
        raise UsageError(flag, f"cannot write into the folder {str(q)!r}")
    return missing


def _check_save(save: Path, out_missing: list[Path]) -> None:
    if save.is_dir():
        raise UsageError("--save", f"expected a file path such as runs/m.safetensors; "
                                   f"{str(save)!r} is a folder")
    parent = save.parent
    if parent.exists():
        if not parent.is_dir():
            raise UsageError("--save", f"{str(parent)!r} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError("--save", f"cannot write into the folder {str(parent)!r}")
        return
    if Path(os.path.abspath(parent)) not in {Path(os.path.abspath(d)) for d in out_missing}:
        raise UsageError("--save", f"the folder {str(parent)!r} does not exist; create it first "
                                   f"(or save into the --out folder)")


@dataclasses.dataclass
class _Plan:
    """What ``compress`` will do, from options that passed every check."""

    ds: dict | None
    prune: object
    quant: object
    keep_list: list[str]
    levels: list | None
    out_missing: list[Path]
    layers: _Layers | None = None
    user: UserModel | None = None


def _check_compress(args) -> _Plan:
    """Every check of ``compress`` that argparse cannot do alone, before any work starts."""
    user = is_user_model(args.model)
    if user:
        if args.data is not None:
            raise UsageError("--data", f"not used with --model {args.model}: the factory's "
                                       f"batches are the calibration data")
        if args.abits.mixed:
            raise UsageError("--abits", "a list of widths (quantized activations) is for the zoo "
                                        "models; with --model package.module:factory give one "
                                        "width")
    else:
        args.model, args.data = _check_model_data(args.model, args.data, cmd="compress")
    prune, bits = args.prune, args.wbits
    quant = Int(bits, sym=not args.asym) if bits else None
    budget, abits = args.budget, args.abits
    if budget is None:
        if prune is None and quant is None:
            raise UsageError("--prune/--wbits", "nothing to do: give --prune and/or --wbits "
                                                "(or --budget)")
        for flag, value in (("--levels", args.levels), ("--database", args.database)):
            if value is not None:
                raise UsageError(flag, "only used with --budget (e.g. --budget 16x)")
        if abits.mixed:
            raise UsageError("--abits", f"a list of widths ({abits}) quantizes activations, "
                                        "which needs --budget bops=Nx")
    elif abits.mixed and budget.metric != "bops":
        raise UsageError("--budget", f"with a list of --abits ({abits}) activations are quantized "
                                     f"and the budget must count BOPs: bops=Nx; got {budget}")
    out_missing = _missing_dirs("--out", Path(args.out))
    if args.save is not None:
        _check_save(Path(args.save), out_missing)
    if args.database is not None:
        _missing_dirs("--database", Path(args.database))

    levels = None
    if budget is not None:
        levels = _budget_levels(args.levels, abits)

    if user:
        ds, user = None, load_user_model(args.model)
        layers = _user_layers(user)
    else:
        from obcjax.zoo import data as zdata

        ds, user = zdata.load_dataset(args.data), None
        layers = _zoo_layers(args.model, ds)
    swept = args.sweep and (user is None or user.evaluate is not None)
    if swept and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--sweep", "the accuracy plot needs matplotlib: pip install "
                                    "obcjax[plots] (or --sweep '' to skip it)")
    keep_list = list(args.keep)
    for pattern in keep_list:
        if not any(re.fullmatch(pattern, p) for p in layers.order):
            raise UsageError("--keep", f"{pattern!r} matches no layer of {args.model} (the whole "
                                       f"path must match); its layers: {', '.join(layers.order)}")
    if args.keep_first:
        keep_list.insert(0, re.escape(layers.order[0]))  # the first layer in forward order
    if budget is None and isinstance(prune, NM):
        for p in layers.order:
            if not any(re.fullmatch(k, p) for k in keep_list) and layers.cols[p] % prune.m:
                raise UsageError(
                    "--prune", f"{prune.n}:{prune.m} needs the input width of every compressed "
                    f"layer to be a multiple of {prune.m}, but {p} has {layers.cols[p]}; leave it "
                    f"dense with --keep {p}, or choose another N:M")
    return _Plan(ds, prune, quant, keep_list, levels, out_missing, layers, user)


def _budget_levels(texts: list[str] | None, abits: ABits) -> list:
    """The database levels of ``--budget``: weight-only (one ``--abits`` width) or mixed."""
    from obcjax import allocation as A

    if abits.mixed:
        if texts is None:
            return A.mixed_levels(abits.widths)
        out = []
        for t in texts:
            try:
                if not _MIXED_LEVEL.match(t.lower()):
                    raise ValueError
                out.append(A.parse_level(t))
            except (ValueError, TypeError):
                raise UsageError("--levels", f"with a list of --abits ({abits}) each level is "
                                             f"<w>w<a>a with a pruning prefix or not (activation "
                                             f"bits 4..8), such as 8w8a,4w4a,2:4+8w8a; got {t!r}"
                                 ) from None
        return out
    out = []
    for t in texts or BUDGET_LEVELS:
        try:
            out.append(_parse_level(t))
        except (ValueError, TypeError):
            raise UsageError("--levels", f"with one --abits width each level is weight-only, such "
                                         f"as none,0.5,w4,0.5+w4,2:4+w4 (8w8a-style levels need a "
                                         f"list of --abits such as 4,8); got {t!r}") from None
    return out


class _OutDir:
    """``--out``: made once the options are valid; on failure, the folders this run made are
    removed again if they are still empty (a folder that existed before is never touched)."""

    def __init__(self, path: Path, missing: list[Path]):
        self.path, self.missing = path, missing

    def make(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def clean(self) -> None:
        for d in self.missing:  # deepest first
            try:
                d.rmdir()  # only an empty folder
            except OSError:
                return


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, sep, *body])


def _pct(acc: float | None, dense: float | None = None) -> str:
    """An accuracy in percent, or its change from dense; "-" without an evaluation."""
    if acc is None:
        return "-"
    return f"{100 * acc:.2f}" if dense is None else f"{100 * (acc - dense):+.2f}"


def _kb(bits: float) -> str:
    return f"{bits / 8 / 1024:.1f}"


def cmd_compress(args) -> int:
    """``obcjax compress``: every option is checked first; then the run, into ``--out``."""
    plan = _check_compress(args)
    out = _OutDir(Path(args.out), plan.out_missing)
    out.make()
    done = False
    try:
        rc = _compress(args, plan, out.path)
        done = rc == 0
        return rc
    finally:
        if not done:
            out.clean()


@dataclasses.dataclass
class _Job:
    """A model ready to compress, zoo or user's, in the one form ``_compress`` works on."""

    model: object
    variables: object  # Linen variable dict, or NNX nnx.State of the whole model
    params: dict  # what the solvers take (Linen params, NNX pure Param dict)
    seq_variables: object  # what compress_sequential takes for the variables
    calib_batches: list
    apply_kwargs: dict | None
    layer_types: tuple
    evaluate: object  # evaluate(variables) -> float, or None
    with_params: object  # params -> variables
    saved_tree: object  # variables -> the tree --save writes
    bn_kwargs: dict | None  # apply_kwargs of batch-norm re-estimation; None: not re-estimated
    test: object = None  # a zoo model's test split (activation quantization's evaluation)


def _zoo_job(args, plan: _Plan) -> _Job:
    from obcjax.zoo import data as zdata
    from obcjax.zoo import models as zmodels
    from obcjax.zoo import train as ztrain

    ds = plan.ds
    variables, info = ztrain.pretrained(args.model, args.data, seed=args.seed)
    model = zmodels.linen_model(args.model, num_classes=zmodels.num_classes_of(args.model, variables))
    test = ds["test"]
    calib = ds["calib"]
    if args.nsamples:
        calib = zdata.Split(calib.x[: args.nsamples], calib.y[: args.nsamples])
    print(f"model {args.model} on {args.data}: {info.get('source', '?')} "
          f"(test accuracy {100 * info['test_accuracy']:.2f}%), calibrating on {len(calib.y)} "
          f"examples", flush=True)
    has_bn = bool(variables.get("batch_stats")) and not args.no_bn
    return _Job(
        model=model, variables=variables, params=variables["params"], seq_variables=variables,
        calib_batches=[x for x, _ in zdata.batches(calib, 128)], apply_kwargs={"train": False},
        layer_types=("Dense", "Conv"),
        evaluate=lambda v: ztrain.evaluate(args.model, v, test)["accuracy"],
        with_params=lambda p: {**variables, "params": p}, saved_tree=dict,
        bn_kwargs={"train": True} if has_bn else None, test=test)


def _user_job(args, plan: _Plan) -> _Job:
    user = plan.user
    batches = user.batches[: args.nsamples] if args.nsamples else user.batches
    kind = "NNX" if user.is_nnx else "Linen"
    print(f"model {user.name} ({kind}, {len(plan.layers.order)} layers), calibrating on "
          f"{len(batches)} batches" + ("" if user.evaluate else "; no evaluate function, so no "
                                       "accuracy (see obcjax compress --help)"), flush=True)
    if not args.no_bn:
        print("note: batch norm is not re-estimated for --model package.module:factory (in "
              "Python: obcjax.oneshot(..., repair_batchnorm=True))", flush=True)
    return _Job(
        model=user.model, variables=user.variables, params=user.params,
        seq_variables=user.params if user.is_nnx else user.variables, calib_batches=batches,
        apply_kwargs=None, layer_types=USER_LAYER_TYPES, evaluate=user.evaluate,
        with_params=user.with_params, saved_tree=user.saved_tree, bn_kwargs=None)


def _compress(args, plan: _Plan, out_dir: Path) -> int:
    import jax
    import numpy as np

    from obcjax.calibration import calibrate
    from obcjax.pipeline import compress_sequential, reestimate_batchnorm
    from obcjax.transforms import LayerSpec, compress, prune_levels

    t0 = time.perf_counter()
    job = _user_job(args, plan) if plan.user else _zoo_job(args, plan)
    model, variables, params0 = job.model, job.variables, job.params
    calib_batches = job.calib_batches
    nsamples = sum(len(_batch_input(b)) for b in calib_batches)

    def evaluate(v):
        return None if job.evaluate is None else float(job.evaluate(v))

    stats = calibrate(model, variables, calib_batches, apply_kwargs=job.apply_kwargs,
                      layer_types=job.layer_types, progress=args.progress)
    prune, quant, bits = plan.prune, plan.quant, args.wbits
    keep_list = plan.keep_list
    keep = [(r, None) for r in keep_list]
    every = "|".join(re.escape(p) for p in plan.layers.order)  # the layers the model calls
    has_bn = job.bn_kwargs is not None

    def run(solver, p=prune, q=quant):
        rules = keep + [(every, LayerSpec(prune=p, quant=q, solver=solver))]
        if args.mode == "sequential":
            out = compress_sequential(model, job.seq_variables, calib_batches, rules,
                                      apply_kwargs=job.apply_kwargs, layer_types=job.layer_types,
                                      rel_damp=args.rel_damp, progress=args.progress)
        else:
            out = compress(params0, stats, rules, rel_damp=args.rel_damp,
                           progress=args.progress)
        return out, finish(out.params)

    def finish(params):
        # batch-norm re-estimation on the calibration data (OBC's BN tuning)
        v = job.with_params(params)
        if has_bn:
            v = reestimate_batchnorm(model, v, calib_batches, apply_kwargs=job.bn_kwargs)
        return v

    dense_acc = evaluate(variables)
    results = {}
    if args.budget and args.abits.mixed:
        results.update(_mixed_runs(args, plan.levels, model, variables, stats, keep,
                                   calib_batches, job.test, has_bn, nsamples))
    elif args.budget:
        results.update(_budget_runs(args, plan.levels, params0, stats, keep, every, finish,
                                    evaluate, nsamples))
    else:
        for solver in args.solvers:
            t = time.perf_counter()
            res, v = run(solver)
            secs = time.perf_counter() - t
            results[solver] = (res, evaluate(v), secs, v)

    first = next(iter(results.values()))[0]
    dense_bits = first.summary["total/dense_bits"]
    rows = [["dense", _pct(dense_acc), _pct(dense_acc, dense_acc), _kb(dense_bits), "1.0x",
             "0.0%", "32", "-"]]
    for solver, (res, a, secs, _) in results.items():
        s = res.summary
        layers = [k[: -len("/params")] for k in s if k.endswith("/params") and k != "total/params"]
        nparams = sum(s[f"{p}/params"] for p in layers)
        nz = sum(s[f"{p}/params"] * (1 - s[f"{p}/sparsity"]) for p in layers)
        rows.append([
            solver, _pct(a), _pct(a, dense_acc), _kb(s["total/size_bits"]),
            f"{s['total/compression']:.1f}x", f"{100 * (1 - nz / nparams):.1f}%",
            "mixed" if args.budget else str(bits or 32), f"{secs:.1f}s",
        ])
    spec_name = LayerSpec(prune=prune, quant=quant).name if not args.budget else f"budget {args.budget}"
    print(f"\ntarget {spec_name}" + ("" if args.budget else " on every layer")
          + (f" except {', '.join(keep_list)}" if keep_list else "")
          + f" ({args.mode}" + (", batch-norm re-estimated)" if has_bn else ")"))
    print(_table(rows, ["method", "acc %", "delta", "size KB", "ratio", "sparsity", "w-bits",
                        "time"]))
    layer_rows = []
    for path in first.summary:
        if not path.endswith("/params") or path == "total/params":
            continue
        p = path[: -len("/params")]
        s = first.summary
        row = [p, s[f"{p}/spec"], str(s[f"{p}/params"]), f"{100 * s[f'{p}/sparsity']:.1f}%",
               str(s[f"{p}/bits"])]
        for res, *_ in results.values():
            row.append(f"{res.losses[p]:.4g}" if p in res.losses else "-")
        layer_rows.append(row)
    print()
    print(_table(layer_rows, ["layer", "spec", "params", "sparsity", "bits"]
                 + [f"loss {s}" for s in results]))

    summary = {
        "model": args.model, "data": args.data, "target": spec_name, "mode": args.mode,
        "kept_dense": keep_list, "batchnorm_reestimated": has_bn,
        "dense_accuracy": dense_acc,
        "methods": {k: {"accuracy": a, "seconds": secs, "summary": r.summary,
                        "losses": r.losses} for k, (r, a, secs, _) in results.items()},
    }
    if args.save:
        from obcjax import export

        solver = next(iter(results))
        res, acc, _, v = results[solver]
        save_path = Path(args.save)
        packed = {f"params/{k}": layer for k, layer in export.pack_compressed(res).items()}
        if plan.user and plan.user.is_nnx:  # the NNX params alone, as a pure dict
            packed = {k.removeprefix("params/"): layer for k, layer in packed.items()}
        saved = job.saved_tree(v)
        export.save_params(save_path, saved, packed, metadata={
            "model": args.model, "data": args.data, "target": spec_name, "solver": solver,
            "test_accuracy": acc})
        on_disk = save_path.stat().st_size
        theory_bits = sum(export.theoretical_bits(x) for x in packed.values())
        n_packed = sum(int(np.prod(x.shape)) for x in packed.values())
        n_all = sum(int(np.size(a)) for a in jax.tree.leaves(saved))
        theory = theory_bits / 8 + 4 * (n_all - n_packed)
        # the size (obcjax.sizes, the table's "size KB") is the packed payload; the file adds
        # its header and byte padding, reported as file bytes
        print(f"\nsaved {solver} model to {save_path}: size {theory / 1024:.1f} KB "
              f"({4 * n_all / theory:.1f}x), file {on_disk / 1024:.1f} KB on disk "
              f"({4 * n_all / on_disk:.1f}x), dense float32 {4 * n_all / 1024:.1f} KB")
        summary["saved"] = {"path": str(save_path), "bytes_on_disk": on_disk,
                            "bytes_theoretical": theory, "bytes_dense_float32": 4 * n_all}
    if args.sweep and job.evaluate is None:
        print("sweep: skipped (the factory returns no evaluate function)")
    elif args.sweep:
        levels = args.sweep
        sweep = {}
        keep_rules = keep + [(every, True)]
        for solver in [s for s in args.solvers if s in ("obc", "magnitude")]:
            plist = prune_levels(params0, stats, levels, rules=keep_rules,
                                 solver=solver, rel_damp=args.rel_damp)
            accs = [evaluate(finish(p)) for p in plist]
            sweep[solver] = accs
            print(f"sweep {solver}: " + "  ".join(f"{100 * s:.0f}%:{100 * a:.1f}"
                                                  for s, a in zip(levels, accs)), flush=True)
        summary["sweep"] = {"sparsity": levels, "accuracy": sweep}
        import matplotlib

        matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for solver, accs in sweep.items():
            ax.plot([100 * s for s in levels], [100 * a for a in accs], "o-",
                    label={"obc": "ExactOBS (OBC)", "magnitude": "magnitude",
                           "gptq": "SparseGPT"}.get(solver, solver))
        ax.axhline(100 * dense_acc, color="gray", ls="--", label="dense")
        ax.set_xlabel("unstructured sparsity of every layer (%)")
        ax.set_ylabel("test accuracy (%)")
        on = f" on {args.data}" if args.data else ""
        ax.set_title(f"{args.model}{on}: one-shot pruning, no retraining")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        png = out_dir / "accuracy_vs_sparsity.png"
        fig.savefig(png, dpi=120)
        print(f"plot: {png}")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"summary: {out_dir / 'summary.json'}  ({time.perf_counter() - t0:.1f}s total)")
    return 0


def _solve_or_explain(args, name, assign):
    """Run an allocation; a budget out of reach is the user's error for the DP, a skip for the
    uniform baseline (None)."""
    try:
        return assign()
    except ValueError as e:  # below the cheapest configuration, or no level fits a layer
        if name == "obc-dp":
            raise UsageError("--budget", f"{args.budget} cannot be met with these levels: {e}; "
                                         f"ask for a smaller factor or add cheaper --levels"
                             ) from e
        print(f"{name}: skipped ({e})", flush=True)
        return None


def _budget_runs(args, levels, params, stats, keep, every, finish, evaluate, ncalib):
    """OBC's database of levels + dynamic program against the best uniform level, same budget."""
    from obcjax import allocation as A
    from obcjax.transforms import compress

    metric, factor = args.budget.metric, args.budget.factor
    positions = {p: max(1, round(int(s.count) / ncalib)) for p, s in stats.items()}
    abits = 32 if metric != "bops" else (lambda level: args.abits.widths[0])
    t = time.perf_counter()
    db = A.build_database(params, stats, levels, rules=keep + [(every, True)],
                          path=args.database, rel_damp=args.rel_damp, positions=positions,
                          abits=abits, overhead=False, progress=args.progress)
    t_db = time.perf_counter() - t
    budget = db.dense_cost(metric) / factor
    print(f"database: {len(db.paths)} layers x {len(levels)} levels in {t_db:.1f}s; budget "
          f"{metric} / {factor:g} of the compressed layers' dense cost", flush=True)
    out = {}
    for name, assign in (("obc-dp", lambda: A.solve(db, budget, metric=metric)),
                         ("obc-uniform", lambda: A.uniform(db, budget, metric, by="loss"))):
        t = time.perf_counter()
        assignment = _solve_or_explain(args, name, assign)
        if assignment is None:
            continue
        res = compress(params, stats, keep + A.to_rules(assignment), rel_damp=args.rel_damp)
        secs = time.perf_counter() - t + t_db
        v = finish(res.params)
        out[name] = (res, evaluate(v), secs, v)
        print(f"{name}: " + ", ".join(f"{p}={a.name if a is not None else 'dense'}"
                                     for p, a in assignment.items()), flush=True)
    return out


def _mixed_runs(args, levels, model, variables, stats, keep, calib_batches, test, has_bn, ncalib):
    """OBC's mixed weight/activation levels + DP under a BOPs budget, in OBC's order (weights,
    then activation ranges on the compressed model, then batch norm), vs the best uniform level."""
    from obcjax import activations as ACT
    from obcjax import allocation as A
    from obcjax.transforms import compress
    from obcjax.zoo import train as ztrain

    factor = args.budget.factor
    ev = {"train": False}
    positions = {p: max(1, round(int(s.count) / ncalib)) for p, s in stats.items()}
    t = time.perf_counter()
    db = ACT.mixed_database(model, variables, calib_batches, stats, levels,
                            rules=keep + [(".*", True)], apply_kwargs=ev, positions=positions,
                            path=args.database, rel_damp=args.rel_damp, error="relative",
                            progress=args.progress)
    t_db = time.perf_counter() - t
    dense = db.dense_cost("bops")
    budget = dense / factor
    print(f"database: {len(db.paths)} layers x {len(levels)} levels in {t_db:.1f}s; budget: BOPs "
          f"/ {factor:g} of the compressed layers at 32w32a (all 8w8a = 16x, all 4w4a = 64x, "
          f"cheapest reachable {dense / db.min_cost('bops'):.0f}x)", flush=True)
    out = {}
    for name, assign in (("obc-dp", lambda: A.solve(db, budget, metric="bops")),
                         ("obc-uniform", lambda: A.uniform(db, budget, "bops", by="loss"))):
        t = time.perf_counter()
        assignment = _solve_or_explain(args, name, assign)
        if assignment is None:
            continue
        res = compress(variables["params"], stats, keep + A.to_rules(assignment),
                       rel_damp=args.rel_damp)
        v, act, _ = ACT.calibrate_mixed(model, {**variables, "params": res.params}, calib_batches,
                                        assignment, apply_kwargs=ev, batchnorm=has_bn)
        acc = ztrain.evaluate_apply(ACT.quantized_apply(model, act, apply_kwargs=ev), v,
                                    test)["accuracy"]
        out[name] = (res, acc, time.perf_counter() - t + t_db, v)
        print(f"{name}: " + ", ".join(f"{p}={lv.name}" for p, lv in assignment.items())
              + f" ({dense / db.cost_of(assignment, 'bops'):.1f}x fewer BOPs than 32w32a)",
              flush=True)
    return out


def _check_evaluate(args):
    """``evaluate``: the file, its model and data, and that they fit, before evaluating."""
    from obcjax import export

    path = Path(args.load)
    if not path.exists():
        raise UsageError("--load", f"no such file {str(path)!r}; expected a model written by "
                                   f"obcjax compress --save")
    if not path.is_file():
        raise UsageError("--load", f"{str(path)!r} is not a file; expected a model written by "
                                   f"obcjax compress --save")
    not_ours = f"{str(path)!r} is not a model written by obcjax compress --save"
    try:
        _, meta = export.load(path)
    except (OSError, ValueError) as e:
        why = str(e).replace(f"{str(path)!r}: ", "").replace(f"{path!r}: ", "")
        raise UsageError("--load", f"{not_ours} ({why})") from e
    meta = meta or {}
    model = args.model or meta.get("model")
    if is_user_model(model):
        return (path, meta, *_check_evaluate_user(args, path, model, export))
    data = args.data or meta.get("data")
    if not model or not data:
        raise UsageError("--model/--data", f"{str(path)!r} names no model or data set; give "
                                           f"--model and --data")
    model, data = _check_model_data(model, data, cmd="evaluate")
    from obcjax.zoo import data as zdata

    ds = zdata.load_dataset(data)
    like = _zoo_layers(model, ds).abstract
    try:
        variables = export.load_params(path, like=like)
    except (OSError, ValueError) as e:  # --debug shows which parameters differ
        raise UsageError("--load", f"{str(path)!r} does not hold a {model} model for {data} (its "
                                   f"parameters differ in names or shapes); give the --model and "
                                   f"--data it was made with, or neither") from e
    return path, meta, model, data, ds, variables


def _check_evaluate_user(args, path, model, export):
    """``evaluate`` of a file saved from ``--model package.module:factory``: the factory's
    evaluate function on the loaded params."""
    if args.data is not None:
        raise UsageError("--data", f"not used with --model {model}: its factory's evaluate "
                                   f"function is the evaluation")
    user = load_user_model(model)
    if user.evaluate is None:
        raise UsageError("--model", f"{model}() returns no evaluate function (the 4th element), "
                                    f"so there is nothing to evaluate the file with")
    like = user.saved_tree(user.variables)
    try:
        loaded = export.load_params(path, like=like)
    except (OSError, ValueError) as e:
        raise UsageError("--load", f"{str(path)!r} does not hold the parameters of {model}() "
                                   f"(names or shapes differ)") from e
    if user.is_nnx:
        variables = user.with_params(loaded)
    else:
        variables = {**user.variables, **loaded}
    return model, "-", None, variables, user.evaluate


def cmd_evaluate(args) -> int:
    checked = _check_evaluate(args)
    path, meta, model, data, ds, variables = checked[:6]
    if len(checked) > 6:  # a user's model: its own evaluate function
        acc = float(checked[6](variables))
    else:
        from obcjax.zoo import train as ztrain

        acc = ztrain.evaluate(model, variables, ds["test"])["accuracy"]
    print(_table([[str(path), model, data, meta.get("target", "?"), f"{100 * acc:.2f}",
                   f"{path.stat().st_size / 1024:.1f}"]],
                  ["file", "model", "data", "target", "acc %", "KB on disk"]))
    return 0


def cmd_train(args) -> int:
    from obcjax.zoo import train as ztrain

    args.model, args.data = _check_model_data(args.model, args.data, cmd="train")
    _, info = ztrain.pretrained(args.model, args.data, seed=args.seed)
    print(f"{args.model} on {args.data}: test accuracy {100 * info['test_accuracy']:.2f}% "
          f"({info.get('source')}; {info.get('path')})")
    return 0


def _enable_compile_cache() -> None:
    # Repeated runs of the same command reuse the compiled solvers instead of recompiling them
    # (compilation, not arithmetic, dominates on small models).
    if os.environ.get("OBCJAX_NO_COMPILE_CACHE"):
        return
    from obcjax.compile_cache import enable_compile_cache

    try:
        enable_compile_cache()
    except Exception as e:  # an old or unusual JAX, an unwritable folder: run without the cache
        print(f"note: compilation cache disabled ({e})", file=sys.stderr)


def _minilm_argv(argv: list[str]) -> list[str] | None:
    """The arguments after ``compress --model minilm`` (its own options), or None."""
    args = list(argv)
    if args and args[0] == "compress":
        args = args[1:]
    elif args and args[0] in ("evaluate", "train"):
        return None
    for i, a in enumerate(args):
        if a == "--model" and i + 1 < len(args) and args[i + 1] == "minilm":
            return args[:i] + args[i + 2 :]
        if a == "--model=minilm":
            return args[:i] + args[i + 1 :]
    return None


def _run_minilm(rest: list[str]) -> int:
    """``compress --model minilm``: the transformer job, its option errors as one line too."""
    from obcjax.recipes import minilm as minilm_recipe

    build = minilm_recipe.build_parser

    def build_one_line():
        ap = build()
        ap.error = _usage_exit  # its errors (argparse's and its own checks) as one line, exit 2
        return ap

    _enable_compile_cache()
    minilm_recipe.build_parser = build_one_line
    try:
        return minilm_recipe.run(rest)
    finally:
        minilm_recipe.build_parser = build


USER_MODEL_HELP = """\
Your own model: --model package.module:factory. The module is imported (the current folder is
on the path) and factory() is called with no arguments. It returns

  (model, variables, batches)  or  (model, variables, batches, evaluate)

  model      a flax.linen.Module (run as model.apply(variables, x)) or a flax.nnx.Module
             (run as model(x); call model.eval() first if it has dropout or batch norm)
  variables  Linen: the variable dict, every collection the model reads ({"params": ...});
             NNX: None (the model's own state), or an nnx.State / pure dict applied over it
  batches    an iterable of calibration batches: an array, a tuple whose first element is
             the input, or a dict with an "x" entry
  evaluate   optional: evaluate(variables) -> accuracy in [0, 1] (any higher-is-better score),
             given the variables with the compressed params in place (Linen: a variable dict;
             NNX: an nnx.State of the whole model). Without it no accuracy is shown and
             --sweep is skipped.

Every Dense, Conv and DenseGeneral layer the model calls (nnx.Linear, nnx.Conv,
nnx.LinearGeneral) is compressed, except those --keep / --keep-first leave dense. Batch norm
is not re-estimated (in Python: obcjax.oneshot(..., repair_batchnorm=True)). --save writes
the Linen variables, or the NNX params as a pure dict; obcjax evaluate --load FILE reads it back
with the same --model (stored in the file) and its evaluate function.
"""


def build_parser() -> argparse.ArgumentParser:
    """The options of ``obcjax`` (``--model minilm`` has its own: :mod:`obcjax.recipes.minilm`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show the traceback of errors in the options too")
    ap = _Parser(prog="obcjax", description=__doc__.splitlines()[0], parents=[common])
    sub = ap.add_subparsers(dest="cmd", metavar="command")
    c = sub.add_parser("compress", parents=[common],
                       help="calibrate and compress a zoo model or your own (default: "
                            "LeNet-5/digits)",
                       description=USER_MODEL_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--model", default="lenet5",
                   help="zoo model (mlp, lenet5, resnet, cnn1d); minilm: the pretrained "
                        "sentence encoder, with its own options (obcjax compress --model minilm "
                        "--help); or package.module:factory, your own model (see above)")
    c.add_argument("--data", default=None,
                   help="data set: digits or mnist1d (default: digits, or the model's own)")
    c.add_argument("--prune", type=_prune_arg, default="0.5",
                   help="sparsity (0.5), N:M (2:4) or none")
    c.add_argument("--wbits", type=_wbits_arg, default="4", help="weight bits 2..8, or none")
    c.add_argument("--asym", action="store_true", help="asymmetric weight grid")
    c.add_argument("--solvers", type=_solvers_arg, default="obc,magnitude",
                   help="comma list of obc, magnitude, gptq (GPTQ/SparseGPT)")
    c.add_argument("--keep", type=_regex_arg, action="append", default=[],
                   help="regex of layers to leave dense (repeatable)")
    c.add_argument("--keep-first", action=argparse.BooleanOptionalAction, default=True,
                   help="leave the first layer dense (default; the usual practice, as in OBC)")
    c.add_argument("--mode", choices=("one-pass", "sequential"), default="one-pass",
                   help="one-pass: every layer from the dense model's statistics (OBC); "
                        "sequential: recalibrate on the compressed prefix (GPTQ/SparseGPT)")
    c.add_argument("--no-bn", action="store_true",
                   help="skip batch-norm re-estimation of models with batch norm")
    c.add_argument("--rel-damp", type=_rel_damp_arg, default=0.01)
    c.add_argument("--nsamples", type=_int_arg(0, "an integer >= 0 (calibration examples; 0 = "
                                                  "all)"),
                   default=0, help="calibration examples (0 = all)")
    c.add_argument("--sweep", type=_sweep_arg, default="0.5,0.6,0.7,0.8,0.9",
                   help="sparsity levels for the accuracy plot ('' to skip)")
    c.add_argument("--seed", type=_int_arg(0, "an integer >= 0"), default=0)
    c.add_argument("--out", default="runs/compress")
    c.add_argument("--progress", action="store_true")
    c.add_argument("--budget", type=_parse_budget, default=None,
                   help="global budget instead of one target: e.g. 16x (model size), "
                        "bops=8x or flops=2x (reduction vs dense); OBC's database of levels "
                        "and dynamic program against the best uniform level")
    c.add_argument("--levels", type=_levels_arg, default=None,
                   help="comma list of database levels, e.g. none,0.5,0.9,w4,0.5+w4,2:4+w4")
    c.add_argument("--abits", type=_abits_arg, default="8",
                   help="activation bits: one value is the activation width in the BOPs count of "
                        "weight-only levels (default 8); a comma list such as 4,8 quantizes the "
                        "activations too, and --budget bops=Nx then picks per layer among OBC's "
                        "mixed levels 8w8a, 4w4a, 2:4+8w8a, 2:4+4w4a (or --levels 8w8a,6w6a,...)")
    c.add_argument("--database", default=None,
                   help="folder to keep the database in (resumable: an interrupted run goes on)")
    c.add_argument("--save", default=None,
                   help="write the first solver's compressed model, packed, to this file")
    e = sub.add_parser("evaluate", parents=[common],
                       help="evaluate a packed model written by compress --save")
    e.add_argument("--load", required=True)
    e.add_argument("--model", default=None,
                   help="zoo model or package.module:factory (default: from the file)")
    e.add_argument("--data", default=None, help="data set (default: from the file)")
    t = sub.add_parser("train", parents=[common], help="train (or load from cache) a zoo model")
    t.add_argument("--model", default="lenet5")
    t.add_argument("--data", default=None,
                   help="data set: digits or mnist1d (default: digits, or the model's own)")
    t.add_argument("--seed", type=_int_arg(0, "an integer >= 0"), default=0)
    return ap


def main(argv=None) -> int:
    """``obcjax``: 0 on success; 2 for a bad option (one line on stderr; errors that argparse
    finds raise ``SystemExit(2)``); a traceback only for a bug, or with ``--debug``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        rest = _minilm_argv(argv)
        if rest is not None:
            # the transformer has its own options (text calibration, group size, act-order)
            return _run_minilm([a for a in rest if a != "--debug"])
        first = next((a for a in argv if a != "--debug"), "-")
        if first.startswith("-") and first not in ("-h", "--help"):
            argv = ["compress", *argv]  # compress is the default command
        args = build_parser().parse_args(argv)
        _enable_compile_cache()
        if args.cmd == "compress":
            return cmd_compress(args)
        if args.cmd == "evaluate":
            return cmd_evaluate(args)
        return cmd_train(args)
    except UsageError as e:
        if debug:
            raise
        sys.stderr.write(f"obcjax: error: {_one_line(str(e))}\n")
        return 2
    except ImportError as e:  # an optional dependency (obcjax._extras.require names its extra)
        if debug or "pip install obcjax[" not in str(e):
            raise
        sys.stderr.write(f"obcjax: error: {_one_line(str(e))}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
