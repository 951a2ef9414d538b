"""Small classifiers as Flax Linen / Flax NNX twins with one parameter layout.

Four models, each written once as a forward function shared by a Linen module and an NNX module,
so the two give the same logits from the same values:

* ``"mlp"``: flatten, ``fc1`` (256) -> ReLU -> ``fc2`` (256) -> ReLU -> ``fc3`` (classes). Any
  input rank.
* ``"lenet5"``: LeNet-5 (LeCun et al. 1998) adapted to 8x8 images: ``conv1`` 6ch 3x3 SAME -> ReLU
  -> max-pool 2 -> ``conv2`` 16ch 3x3 SAME -> ReLU -> max-pool 2 -> ``fc1`` 120 -> ``fc2`` 84 ->
  ``fc3``. Images ``(H, W, C)`` with ``H, W >= 4``.
* ``"resnet"``: a small ResNet (He et al. 2016) with BatchNorm: stem ``conv1`` 16ch 3x3 + ``bn1``,
  then ``block1`` (16ch), ``block2`` (32ch, stride 2) and ``block3`` (64ch, stride 2), each
  ``conv1/bn1/conv2/bn2`` with an identity shortcut or a 1x1 strided projection
  ``proj/proj_bn``; global average pool; head ``fc``. Convolutions before a BatchNorm have no bias.
  Images ``(H, W, C)``.
* ``"cnn1d"``: the MNIST-1D CNN of Greydanus (2020) with SAME padding: ``conv1`` 32ch k5 s2 ->
  ``conv2`` 32ch k3 s2 -> ``conv3`` 32ch k3 s2 (ReLU after each) -> flatten -> ``fc``. Signals
  ``(L, C)``.

Parameter layout (identical '/'-joined paths, shapes and dtypes in Linen and NNX): Dense kernel
``(in, out)`` and bias ``(out,)``; Conv kernel HWIO (``(k, in, out)`` in 1-D); BatchNorm ``scale``
and ``bias`` under ``"params"`` and running ``mean`` / ``var`` under ``"batch_stats"``. Variables
are plain nested dicts ``{"params": ..., "batch_stats": ...}`` (``batch_stats`` is ``{}`` for
models without BatchNorm).

Modes: Linen ``__call__(x, train=False)`` (``train=True`` normalizes with batch statistics and
needs ``mutable=["batch_stats"]``). NNX models are built in **eval mode** (BatchNorm uses the
running statistics); ``model.train()`` / ``model.eval()`` switch it, and ``model(x, train=True)``
overrides the mode for one call.

Example:
    >>> variables = init_variables("lenet5", (8, 8, 1))
    >>> x = jnp.zeros((2, 8, 8, 1))
    >>> logits = apply("lenet5", variables, x)                     # Linen
    >>> model = nnx_from_variables("lenet5", variables, input_shape=(8, 8, 1))
    >>> bool(jnp.allclose(model(x), logits, atol=1e-5))            # NNX twin
    True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "MODEL_NAMES",
    "linen_model",
    "nnx_model",
    "init_variables",
    "nnx_from_variables",
    "variables_from_nnx",
    "apply",
    "num_classes_of",
    "count_params",
]

MODEL_NAMES = ("mlp", "lenet5", "resnet", "cnn1d")

_MLP_HIDDEN = (256, 256)
_LENET_CHANNELS = (6, 16)
_LENET_HIDDEN = (120, 84)
_RESNET_STEM = 16
# (name, channels, stride) per residual block; a block with stride 2 or a change of width
# gets a 1x1 projection shortcut.
_RESNET_BLOCKS = (("block1", 16, 1), ("block2", 32, 2), ("block3", 64, 2))
_CNN1D_LAYERS = (("conv1", 32, 5, 2), ("conv2", 32, 3, 2), ("conv3", 32, 3, 2))
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
# Standard deviation of a unit normal truncated to [-2, 2].
_TRUNC_STD = 0.87962566103423978

# BatchNorm application: given a BN layer and its input, normalize in the caller's mode.
BNFn = Callable[[Any, jax.Array], jax.Array]


# ---------------------------------------------------------------------------------------------
# Forward passes, shared by the Linen and the NNX twin (``m`` has the named submodules).
# ---------------------------------------------------------------------------------------------


def _check_rank(name: str, x: jax.Array, spatial: int) -> None:
    if x.ndim != spatial + 2:
        want = "(N, H, W, C)" if spatial == 2 else "(N, L, C)"
        raise ValueError(
            f"{name}: expected inputs of shape {want} (rank {spatial + 2}), got shape {x.shape}"
        )


def _pool(x: jax.Array) -> jax.Array:
    k = (2,) * (x.ndim - 2)
    return nn.max_pool(x, k, strides=k, padding="VALID")


def _mlp_forward(m, x: jax.Array, bn: BNFn) -> jax.Array:
    del bn
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(m.fc1(x))
    x = jax.nn.relu(m.fc2(x))
    return m.fc3(x)


def _lenet_forward(m, x: jax.Array, bn: BNFn) -> jax.Array:
    del bn
    _check_rank("lenet5", x, 2)
    x = _pool(jax.nn.relu(m.conv1(x)))
    x = _pool(jax.nn.relu(m.conv2(x)))
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(m.fc1(x))
    x = jax.nn.relu(m.fc2(x))
    return m.fc3(x)


def _block_forward(b, x: jax.Array, bn: BNFn) -> jax.Array:
    h = jax.nn.relu(bn(b.bn1, b.conv1(x)))
    h = bn(b.bn2, b.conv2(h))
    shortcut = bn(b.proj_bn, b.proj(x)) if b.project else x
    return jax.nn.relu(h + shortcut)


def _resnet_forward(m, x: jax.Array, bn: BNFn) -> jax.Array:
    _check_rank("resnet", x, 2)
    x = jax.nn.relu(bn(m.bn1, m.conv1(x)))
    for name, _, _ in _RESNET_BLOCKS:
        x = _block_forward(getattr(m, name), x, bn)
    return m.fc(x.mean(axis=(1, 2)))


def _cnn1d_forward(m, x: jax.Array, bn: BNFn) -> jax.Array:
    del bn
    _check_rank("cnn1d", x, 1)
    for name, *_ in _CNN1D_LAYERS:
        x = jax.nn.relu(getattr(m, name)(x))
    return m.fc(x.reshape(x.shape[0], -1))


def _linen_bn(train: bool) -> BNFn:
    return lambda layer, h: layer(h, use_running_average=not train)


def _nnx_bn(train: bool | None) -> BNFn:
    if train is None:
        return lambda layer, h: layer(h)
    return lambda layer, h: layer(h, use_running_average=not train)


# ---------------------------------------------------------------------------------------------
# Linen
# ---------------------------------------------------------------------------------------------


class LinenMLP(nn.Module):
    """Linen MLP: ``fc1``, ``fc2`` (256 each, ReLU), ``fc3`` (classes); flattens its input."""

    num_classes: int = 10

    def setup(self):
        self.fc1 = nn.Dense(_MLP_HIDDEN[0])
        self.fc2 = nn.Dense(_MLP_HIDDEN[1])
        self.fc3 = nn.Dense(self.num_classes)

    def __call__(self, x, train: bool = False):
        return _mlp_forward(self, x, _linen_bn(train))


class LinenLeNet5(nn.Module):
    """Linen LeNet-5 for small images ``(N, H, W, C)``; see the module docstring."""

    num_classes: int = 10

    def setup(self):
        self.conv1 = nn.Conv(_LENET_CHANNELS[0], (3, 3), padding="SAME")
        self.conv2 = nn.Conv(_LENET_CHANNELS[1], (3, 3), padding="SAME")
        self.fc1 = nn.Dense(_LENET_HIDDEN[0])
        self.fc2 = nn.Dense(_LENET_HIDDEN[1])
        self.fc3 = nn.Dense(self.num_classes)

    def __call__(self, x, train: bool = False):
        return _lenet_forward(self, x, _linen_bn(train))


def _linen_bn_layer() -> nn.BatchNorm:
    return nn.BatchNorm(momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON)


class LinenResBlock(nn.Module):
    """Linen residual block: ``conv1/bn1/conv2/bn2`` (+ ``proj/proj_bn`` when ``project``)."""

    features: int
    stride: int = 1
    project: bool = False

    def setup(self):
        s = (self.stride, self.stride)
        self.conv1 = nn.Conv(self.features, (3, 3), s, padding="SAME", use_bias=False)
        self.bn1 = _linen_bn_layer()
        self.conv2 = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False)
        self.bn2 = _linen_bn_layer()
        if self.project:
            self.proj = nn.Conv(self.features, (1, 1), s, padding="SAME", use_bias=False)
            self.proj_bn = _linen_bn_layer()


class LinenResNet(nn.Module):
    """Linen small ResNet for images ``(N, H, W, C)``; see the module docstring."""

    num_classes: int = 10

    def setup(self):
        self.conv1 = nn.Conv(_RESNET_STEM, (3, 3), padding="SAME", use_bias=False)
        self.bn1 = _linen_bn_layer()
        width = _RESNET_STEM
        for name, features, stride in _RESNET_BLOCKS:
            project = stride != 1 or features != width
            setattr(self, name, LinenResBlock(features, stride, project))
            width = features
        self.fc = nn.Dense(self.num_classes)

    def __call__(self, x, train: bool = False):
        return _resnet_forward(self, x, _linen_bn(train))


class LinenCNN1D(nn.Module):
    """Linen 1-D CNN for signals ``(N, L, C)`` (MNIST-1D); see the module docstring."""

    num_classes: int = 10

    def setup(self):
        for name, features, k, stride in _CNN1D_LAYERS:
            setattr(self, name, nn.Conv(features, (k,), (stride,), padding="SAME"))
        self.fc = nn.Dense(self.num_classes)

    def __call__(self, x, train: bool = False):
        return _cnn1d_forward(self, x, _linen_bn(train))


# ---------------------------------------------------------------------------------------------
# NNX
# ---------------------------------------------------------------------------------------------


def _nnx_bn_layer(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(
        features,
        use_running_average=True,
        momentum=_BN_MOMENTUM,
        epsilon=_BN_EPSILON,
        rngs=rngs,
    )


class NNXMLP(nnx.Module):
    """NNX twin of :class:`LinenMLP`; ``input_shape`` is one example's shape."""

    def __init__(self, num_classes: int = 10, *, input_shape: Sequence[int], rngs: nnx.Rngs):
        din = math.prod(input_shape)
        self.fc1 = nnx.Linear(din, _MLP_HIDDEN[0], rngs=rngs)
        self.fc2 = nnx.Linear(_MLP_HIDDEN[0], _MLP_HIDDEN[1], rngs=rngs)
        self.fc3 = nnx.Linear(_MLP_HIDDEN[1], num_classes, rngs=rngs)

    def __call__(self, x, train: bool | None = None):
        return _mlp_forward(self, x, _nnx_bn(train))


class NNXLeNet5(nnx.Module):
    """NNX twin of :class:`LinenLeNet5`; ``input_shape`` is ``(H, W, C)``."""

    def __init__(self, num_classes: int = 10, *, input_shape: Sequence[int], rngs: nnx.Rngs):
        h, w, c = input_shape
        c1, c2 = _LENET_CHANNELS
        self.conv1 = nnx.Conv(c, c1, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), padding="SAME", rngs=rngs)
        self.fc1 = nnx.Linear((h // 4) * (w // 4) * c2, _LENET_HIDDEN[0], rngs=rngs)
        self.fc2 = nnx.Linear(_LENET_HIDDEN[0], _LENET_HIDDEN[1], rngs=rngs)
        self.fc3 = nnx.Linear(_LENET_HIDDEN[1], num_classes, rngs=rngs)

    def __call__(self, x, train: bool | None = None):
        return _lenet_forward(self, x, _nnx_bn(train))


class NNXResBlock(nnx.Module):
    """NNX twin of :class:`LinenResBlock`."""

    def __init__(self, din: int, features: int, stride: int, project: bool, *, rngs: nnx.Rngs):
        s = (stride, stride)
        self.project = project
        self.conv1 = nnx.Conv(din, features, (3, 3), s, padding="SAME", use_bias=False, rngs=rngs)
        self.bn1 = _nnx_bn_layer(features, rngs)
        self.conv2 = nnx.Conv(features, features, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn2 = _nnx_bn_layer(features, rngs)
        if project:
            self.proj = nnx.Conv(
                din, features, (1, 1), s, padding="SAME", use_bias=False, rngs=rngs
            )
            self.proj_bn = _nnx_bn_layer(features, rngs)


class NNXResNet(nnx.Module):
    """NNX twin of :class:`LinenResNet`; ``input_shape`` is ``(H, W, C)``."""

    def __init__(self, num_classes: int = 10, *, input_shape: Sequence[int], rngs: nnx.Rngs):
        c = input_shape[-1]
        self.conv1 = nnx.Conv(c, _RESNET_STEM, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn1 = _nnx_bn_layer(_RESNET_STEM, rngs)
        width = _RESNET_STEM
        for name, features, stride in _RESNET_BLOCKS:
            project = stride != 1 or features != width
            setattr(self, name, NNXResBlock(width, features, stride, project, rngs=rngs))
            width = features
        self.fc = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x, train: bool | None = None):
        return _resnet_forward(self, x, _nnx_bn(train))


class NNXCNN1D(nnx.Module):
    """NNX twin of :class:`LinenCNN1D`; ``input_shape`` is ``(L, C)``."""

    def __init__(self, num_classes: int = 10, *, input_shape: Sequence[int], rngs: nnx.Rngs):
        length, din = input_shape
        for name, features, k, stride in _CNN1D_LAYERS:
            conv = nnx.Conv(din, features, (k,), (stride,), padding="SAME", rngs=rngs)
            setattr(self, name, conv)
            # SAME padding with stride s keeps ceil(L / s) positions.
            length, din = -(-length // stride), features
        self.fc = nnx.Linear(length * din, num_classes, rngs=rngs)

    def __call__(self, x, train: bool | None = None):
        return _cnn1d_forward(self, x, _nnx_bn(train))


# ---------------------------------------------------------------------------------------------
# Registry and conversions
# ---------------------------------------------------------------------------------------------

# name -> (Linen class, NNX class, head layer, example rank or None for any)
_REGISTRY: dict[str, tuple[type[nn.Module], type[nnx.Module], str, int | None]] = {
    "mlp": (LinenMLP, NNXMLP, "fc3", None),
    "lenet5": (LinenLeNet5, NNXLeNet5, "fc3", 3),
    "resnet": (LinenResNet, NNXResNet, "fc", 3),
    "cnn1d": (LinenCNN1D, NNXCNN1D, "fc", 2),
}


def _entry(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    return _REGISTRY[name]


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return int(num_classes)


def _check_input_shape(name: str, input_shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in input_shape)
    except TypeError:
        raise TypeError(
            f"{name}: input_shape must be a sequence of ints (one example's shape, no batch "
            f"axis), got {input_shape!r}"
        ) from None
    rank = _entry(name)[3]
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"{name}: input_shape must be non-empty and positive, got {shape}")
    if rank is not None and len(shape) != rank:
        want = "(H, W, C)" if rank == 3 else "(L, C)"
        raise ValueError(
            f"{name}: input_shape must be one example's shape {want} (no batch axis), got {shape}"
        )
    if name == "lenet5" and min(shape[:2]) < 4:
        raise ValueError(f"lenet5: images must be at least 4x4 (two 2x2 pools), got {shape}")
    return shape


def linen_model(name: str, num_classes: int = 10) -> nn.Module:
    """The Linen module of a zoo model.

    Args:
      name: one of :data:`MODEL_NAMES`.
      num_classes: width of the head.

    Returns:
      A Linen module with ``__call__(x, train=False)`` returning logits ``(N, num_classes)``.

    Example:
        >>> module = linen_model("mlp")
        >>> variables = init_variables("mlp", (8, 8, 1))  # or module.init(jax.random.key(0), x)
        >>> module.apply(variables, jnp.zeros((1, 8, 8, 1))).shape
        (1, 10)
    """
    return _entry(name)[0](num_classes=_check_num_classes(num_classes))


def nnx_model(
    name: str, num_classes: int = 10, *, input_shape: Sequence[int], rngs: nnx.Rngs
) -> nnx.Module:
    """A freshly initialized NNX twin of a zoo model, in eval mode.

    The initial values have Flax's default distributions but are drawn as in
    :func:`init_variables`, from a NumPy generator seeded by one key of ``rngs.params``: building
    the NNX classes directly draws every parameter with an eagerly dispatched JAX random op, which
    costs 10-17 s of CPU for LeNet-5 or the ResNet on a small machine (measured), against well
    under a second here. The NNX classes (``NNXLeNet5``, ...) can still be built directly.

    Args:
      name: one of :data:`MODEL_NAMES`.
      num_classes: width of the head.
      input_shape: one example's shape, without the batch axis (e.g. ``(8, 8, 1)``).
      rngs: NNX random streams; one key of its ``params`` stream is consumed.

    Returns:
      An ``nnx.Module`` with ``__call__(x, train=None)``; BatchNorm layers start in eval mode
      (call ``model.train()`` to train with batch statistics).

    Example:
        >>> model = nnx_model("resnet", input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 8, 8, 1))).shape
        (2, 10)
    """
    shape = _check_input_shape(name, input_shape)
    classes = _check_num_classes(num_classes)
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"{name}: rngs must be an nnx.Rngs, got {type(rngs).__name__}")
    key_bits = np.asarray(jax.random.key_data(rngs.params()), np.uint32).ravel()
    seed = np.random.SeedSequence(key_bits.tolist())
    variables = _draw_variables(name, shape, classes, np.random.default_rng(seed))
    return nnx_from_variables(name, variables, input_shape=shape)


def init_variables(
    name: str, input_shape: Sequence[int], *, num_classes: int = 10, seed: int = 0
) -> dict:
    """Initial Linen variables of a zoo model, drawn with NumPy.

    The distributions are Flax's defaults (kernels LeCun-normal truncated at 2 std, biases 0,
    BatchNorm scale 1, running mean 0 and variance 1); the draws come from
    ``np.random.default_rng(seed)`` in parameter order, because compiling a jitted Linen init
    (threefry random bits for every layer) costs seconds on a small CPU. The shapes come from
    the Linen module (``jax.eval_shape`` of its ``init``).

    Args:
      name: one of :data:`MODEL_NAMES`.
      input_shape: one example's shape, without the batch axis.
      num_classes: width of the head.
      seed: seed of the ``np.random.default_rng`` the initial values are drawn from.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` as plain nested dicts of arrays (``batch_stats`` is
      ``{}`` for models without BatchNorm).

    Example:
        >>> v = init_variables("lenet5", (8, 8, 1))
        >>> v["params"]["conv1"]["kernel"].shape
        (3, 3, 1, 6)
    """
    shape = _check_input_shape(name, input_shape)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{name}: seed must be an int >= 0, got {seed!r}")
    return _draw_variables(
        name, shape, _check_num_classes(num_classes), np.random.default_rng(seed)
    )


def _draw_variables(
    name: str, shape: tuple[int, ...], num_classes: int, rng: np.random.Generator
) -> dict:
    module = linen_model(name, num_classes)
    abstract = jax.eval_shape(
        module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    )
    abstract = _plain(abstract)
    abstract.setdefault("batch_stats", {})

    def draw(path, leaf):
        kind = path[-1].key
        if kind == "kernel":
            # LeCun normal, truncated at 2 std and rescaled to keep the variance 1 / fan_in.
            fan_in = math.prod(leaf.shape[:-1])
            z = rng.standard_normal(leaf.shape)
            bad = np.abs(z) > 2
            while bad.any():
                z[bad] = rng.standard_normal(int(bad.sum()))
                bad = np.abs(z) > 2
            value = z * (math.sqrt(1.0 / fan_in) / _TRUNC_STD)
        elif kind in ("scale", "var"):
            value = np.ones(leaf.shape)
        else:  # bias, mean
            value = np.zeros(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return {
        coll: jax.tree_util.tree_map_with_path(draw, abstract[coll])
        for coll in ("params", "batch_stats")
    }


def _plain(tree):
    """Nested dicts (not FrozenDict) all the way down, leaves untouched."""
    if isinstance(tree, Mapping):
        return {str(k): _plain(v) for k, v in tree.items()}
    return tree


def _flat(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, (*prefix, str(k))))
        else:
            out[(*prefix, str(k))] = v
    return out


def num_classes_of(name: str, variables: Mapping) -> int:
    """The head width of a zoo model's variables (the last kernel's output size)."""
    head = _entry(name)[2]
    try:
        return int(variables["params"][head]["kernel"].shape[-1])
    except (KeyError, TypeError, AttributeError):
        raise ValueError(
            f"{name}: variables lack params/{head}/kernel; expected Linen variables "
            f"{{'params': ..., 'batch_stats': ...}} of a {name!r} model"
        ) from None


def nnx_from_variables(
    name: str,
    variables: Mapping,
    *,
    input_shape: Sequence[int],
    num_classes: int | None = None,
) -> nnx.Module:
    """The NNX twin of a zoo model holding exactly the given Linen variables, in eval mode.

    Args:
      name: one of :data:`MODEL_NAMES`.
      variables: ``{"params": ..., "batch_stats": ...}`` in the Linen layout (not modified; the
        NNX model holds the same arrays, numpy inputs are converted).
      input_shape: one example's shape, without the batch axis.
      num_classes: head width; inferred from the variables when None, checked when given.

    Returns:
      An ``nnx.Module`` in eval mode.

    Raises:
      ValueError: if a path is missing or extra, or a shape or dtype differs from the model's.

    Example:
        >>> v = init_variables("cnn1d", (40, 1))
        >>> model = nnx_from_variables("cnn1d", v, input_shape=(40, 1))
        >>> variables_from_nnx(model)["params"]["conv1"]["kernel"].shape
        (5, 1, 32)
    """
    shape = _check_input_shape(name, input_shape)
    inferred = num_classes_of(name, variables)
    if num_classes is not None and _check_num_classes(num_classes) != inferred:
        raise ValueError(
            f"{name}: num_classes={num_classes} but the variables' head has {inferred} outputs"
        )
    cls = _entry(name)[1]
    abstract = nnx.eval_shape(lambda: cls(inferred, input_shape=shape, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    given = {coll: _flat(variables.get(coll, {}) or {}) for coll in ("params", "batch_stats")}
    unknown = set(variables) - {"params", "batch_stats"}
    if unknown:
        raise ValueError(f"{name}: unexpected variable collections {sorted(unknown)}")
    pure: dict = {}
    wanted: dict[str, set] = {"params": set(), "batch_stats": set()}
    for path, var in nnx.to_flat_state(state):
        coll = "batch_stats" if isinstance(var, nnx.BatchStat) else "params"
        key = tuple(str(p) for p in path)
        wanted[coll].add(key)
        where = f"{name}: {coll}/{'/'.join(key)}"
        if key not in given[coll]:
            raise ValueError(f"{where} is missing from the variables")
        value = jnp.asarray(given[coll][key])
        spec = var.get_value()
        if value.shape != spec.shape or value.dtype != spec.dtype:
            raise ValueError(
                f"{where} has shape {value.shape} {value.dtype}, the model (input_shape={shape}) "
                f"needs {spec.shape} {spec.dtype}"
            )
        node = pure
        for p in key[:-1]:
            node = node.setdefault(p, {})
        node[key[-1]] = value
    for coll in ("params", "batch_stats"):
        extra = set(given[coll]) - wanted[coll]
        if extra:
            paths = sorted("/".join(k) for k in extra)
            raise ValueError(f"{name}: {coll} has entries the model does not use: {paths}")
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def variables_from_nnx(model: nnx.Module) -> dict:
    """Linen-layout variables ``{"params", "batch_stats"}`` of an NNX zoo model (same arrays).

    Example:
        >>> model = nnx_model("mlp", input_shape=(40, 1), rngs=nnx.Rngs(0))
        >>> sorted(variables_from_nnx(model)["params"])
        ['fc1', 'fc2', 'fc3']
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"variables_from_nnx: expected an nnx.Module, got {type(model).__name__}")
    return {
        "params": _plain(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
        "batch_stats": _plain(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))),
    }


@functools.lru_cache(maxsize=64)
def _jitted_apply(name: str, num_classes: int, train: bool):
    module = linen_model(name, num_classes)

    def run(variables, x):
        if train:
            return module.apply(variables, x, train=True, mutable=["batch_stats"])[0]
        return module.apply(variables, x, train=False)

    return jax.jit(run)


def apply(name: str, variables: Mapping, x: jax.typing.ArrayLike, *, train: bool = False):
    """Logits of a zoo model (Linen apply, jitted and cached per model).

    Args:
      name: one of :data:`MODEL_NAMES`.
      variables: ``{"params": ..., "batch_stats": ...}``.
      x: ``(N, *input_shape)`` inputs.
      train: if True, BatchNorm normalizes with the batch's statistics (the updated running
        statistics are discarded; use :func:`obcjax.zoo.train.make_train_step` to train).

    Returns:
      ``(N, num_classes)`` float32 logits.

    Example:
        >>> v = init_variables("mlp", (8, 8, 1))
        >>> apply("mlp", v, jnp.zeros((3, 8, 8, 1))).shape
        (3, 10)
    """
    fn = _jitted_apply(name, num_classes_of(name, variables), bool(train))
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    return fn(variables, jnp.asarray(x, jnp.float32))


def count_params(tree) -> int:
    """Number of scalars in a pytree of arrays (e.g. ``variables["params"]``)."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))
