"""A Llama-shaped decoder-only transformer in Flax NNX, and a synthetic token stream to calibrate it.

The model follows the Llama layout (Touvron et al. 2023) at any size: token embedding, ``depth``
pre-norm decoder blocks, a final RMSNorm and an untied ``lm_head``. Each block is

    ``h = x + attn(input_norm(x), cos, sin)``;  ``out = h + mlp(post_norm(h))``

with RMSNorm, causal multi-head attention with rotary position embeddings (grouped-query when
``kv_heads < heads``) over bias-free ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``, and a SwiGLU
MLP ``down_proj(silu(gate_proj(h)) * up_proj(h))``. Every projection is an ``nnx.Linear``, so its
kernel is ``(in, out)``. The blocks are the attributes ``layers_0 ... layers_{depth-1}`` (string
names, so parameter paths read ``layers_3/attn/q_proj``); each is called as
``block(x, cos, sin)`` with the rotary tables computed once by the model.

The calibration data is a Markov chain over the vocabulary (:func:`markov_chain`): each token has a
few likely successors with random (Dirichlet) weights, so a model trained briefly on it
(:func:`train`) has structured activations and the error of a compressed model is meaningful. All
randomness is from explicit seeds.

Example:
    >>> cfg = LlamaConfig(vocab=64, dim=32, depth=2, heads=4, hidden=64)
    >>> model = llama(cfg, seed=0)
    >>> chain = markov_chain(cfg.vocab, seed=0)
    >>> tokens = token_batches(chain, n_batches=2, batch_size=4, seq_len=16, seed=1)
    >>> model(tokens[0]).shape
    (4, 16, 64)
    >>> sorted(nnx.state(model, nnx.Param).to_pure_dict()["layers_1"]["attn"])
    ['k_proj', 'o_proj', 'q_proj', 'v_proj']
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = [
    "LlamaConfig",
    "RMSNorm",
    "Attention",
    "MLP",
    "Block",
    "Llama",
    "llama",
    "rotary_tables",
    "markov_chain",
    "token_batches",
    "next_token_loss",
    "train",
]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Sizes of a :class:`Llama`.

    Attributes:
      vocab: vocabulary size. dim: model width. depth: number of blocks. heads: attention heads
        (``dim`` must be divisible by it). kv_heads: key/value heads (None: ``heads``; fewer is
        grouped-query attention). hidden: SwiGLU width (None: ``8/3 · dim`` rounded up to a
        multiple of 16, as Llama). rope_theta: rotary base. eps: RMSNorm epsilon.
    """

    vocab: int = 256
    dim: int = 64
    depth: int = 4
    heads: int = 4
    kv_heads: int | None = None
    hidden: int | None = None
    rope_theta: float = 10000.0
    eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab", "dim", "depth", "heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"LlamaConfig: {name} must be a positive int, got {v!r}")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(
                f"LlamaConfig: dim ({self.dim}) must split into {self.heads} heads of even width"
            )
        if self.heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig: heads ({self.heads}) must be a multiple of kv_heads "
                f"({self.n_kv_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def n_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def mlp_hidden(self) -> int:
        if self.hidden is not None:
            return self.hidden
        return -(-(8 * self.dim // 3) // 16) * 16


class RMSNorm(nnx.Module):
    """``x / rms(x) · scale`` over the last axis (computed in float32)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def rotary_tables(seq_len: int, head_dim: int, theta: float = 10000.0):
    """``(cos, sin)``, each ``(seq_len, head_dim // 2)``, for positions ``0`` to ``seq_len - 1``."""
    inv = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    ang = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv[None, :]
    return jnp.cos(ang), jnp.sin(ang)


def _rotate(x, cos, sin):
    # x: (B, S, H, hd); the two halves of head_dim are the rotated pairs (the HF Llama layout)
    x1, x2 = jnp.split(x, 2, axis=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    """Causal rotary (grouped-query) attention with bias-free q/k/v/o projections."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        hd, kv = cfg.head_dim, cfg.n_kv_heads
        self.heads, self.kv_heads, self.head_dim = cfg.heads, kv, hd
        lin = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)  # noqa: E731
        self.q_proj = lin(cfg.dim, cfg.heads * hd)
        self.k_proj = lin(cfg.dim, kv * hd)
        self.v_proj = lin(cfg.dim, kv * hd)
        self.o_proj = lin(cfg.heads * hd, cfg.dim)

    def __call__(self, x, cos, sin):
        B, S, _ = x.shape
        H, KV, hd = self.heads, self.kv_heads, self.head_dim
        q = _rotate(self.q_proj(x).reshape(B, S, H, hd), cos, sin)
        k = _rotate(self.k_proj(x).reshape(B, S, KV, hd), cos, sin)
        v = self.v_proj(x).reshape(B, S, KV, hd)
        if KV != H:
            k, v = jnp.repeat(k, H // KV, axis=2), jnp.repeat(v, H // KV, axis=2)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(hd)
        causal = jnp.tril(jnp.ones((S, S), bool))
        logits = jnp.where(causal[None, None], logits, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, S, H * hd)
        return self.o_proj(out)


class MLP(nnx.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        lin = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)  # noqa: E731
        self.gate_proj = lin(cfg.dim, cfg.mlp_hidden)
        self.up_proj = lin(cfg.dim, cfg.mlp_hidden)
        self.down_proj = lin(cfg.mlp_hidden, cfg.dim)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """One pre-norm decoder block: ``x + attn(norm(x))``, then ``h + mlp(norm(h))``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_norm = RMSNorm(cfg.dim, cfg.eps)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin):
        h = x + self.attn(self.input_norm(x), cos, sin)
        return h + self.mlp(self.post_norm(h))


class Llama(nnx.Module):
    """The decoder: ``tokens (B, S) int -> logits (B, S, vocab)``.

    Blocks are the attributes ``layers_0 ... layers_{depth-1}`` (``model.blocks`` lists them).
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab, cfg.dim, rngs=rngs)
        for i in range(cfg.depth):
            setattr(self, f"layers_{i}", Block(cfg, rngs=rngs))
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        self.lm_head = nnx.Linear(cfg.dim, cfg.vocab, use_bias=False, rngs=rngs)

    @property
    def blocks(self) -> list[Block]:
        return [getattr(self, f"layers_{i}") for i in range(self.cfg.depth)]

    def __call__(self, tokens):
        x = self.embed(tokens)
        cos, sin = rotary_tables(tokens.shape[-1], self.cfg.head_dim, self.cfg.rope_theta)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))


def llama(cfg: LlamaConfig | None = None, *, seed: int = 0, **sizes) -> Llama:
    """A randomly initialised :class:`Llama` (``cfg`` or keyword sizes of :class:`LlamaConfig`).

    Example:
        >>> llama(dim=16, depth=1, heads=2, vocab=32).cfg.mlp_hidden
        48
    """
    if cfg is None:
        cfg = LlamaConfig(**sizes)
    elif sizes:
        cfg = dataclasses.replace(cfg, **sizes)
    return Llama(cfg, rngs=nnx.Rngs(seed))


# ----------------------------------------------------------------------------- data


def markov_chain(vocab: int, *, seed: int = 0, branching: int = 4, alpha: float = 0.5):
    """A first-order Markov chain over ``vocab`` tokens: ``(vocab, vocab)`` float64 rows summing to 1.

    Each token has ``branching`` successors, chosen at random, with Dirichlet(``alpha``) weights;
    every other transition has probability 0. Deterministic from ``seed``.
    """
    if vocab < 2 or not 1 <= branching <= vocab:
        raise ValueError(f"markov_chain: need vocab >= 2 and 1 <= branching <= vocab, got "
                         f"vocab={vocab}, branching={branching}")
    rng = np.random.default_rng(seed)
    P = np.zeros((vocab, vocab))
    for t in range(vocab):
        succ = rng.choice(vocab, size=branching, replace=False)
        P[t, succ] = rng.dirichlet(np.full(branching, alpha))
    return P


def token_batches(chain, *, n_batches: int, batch_size: int, seq_len: int, seed: int = 0):
    """``n_batches`` int32 arrays ``(batch_size, seq_len)`` of sequences sampled from ``chain``.

    Every sequence starts at a uniformly random token; all draws come from ``seed``.
    """
    chain = np.asarray(chain, np.float64)
    V = chain.shape[0]
    rng = np.random.default_rng(seed)
    cum = np.cumsum(chain, axis=1)
    cum[:, -1] = 1.0
    n = n_batches * batch_size
    out = np.empty((n, seq_len), np.int32)
    out[:, 0] = rng.integers(0, V, size=n)
    u = rng.random((n, seq_len))
    for s in range(1, seq_len):
        prev = out[:, s - 1]
        out[:, s] = (u[:, s, None] > cum[prev]).sum(axis=1)
    return [out[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


def next_token_loss(model: Llama, tokens) -> jax.Array:
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from the prefix."""
    logits = model(tokens)[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def train(model: Llama, batches, *, steps: int = 100, lr: float = 3e-3, seed: int = 0):
    """Train ``model`` in place with Adam on next-token prediction, cycling over ``batches``.

    Returns:
      The list of per-step losses (floats).

    Example:
        >>> cfg = LlamaConfig(vocab=32, dim=16, depth=1, heads=2)
        >>> m = llama(cfg, seed=0)
        >>> data = token_batches(markov_chain(32, seed=0), n_batches=2, batch_size=8, seq_len=16)
        >>> losses = train(m, data, steps=30)
        >>> losses[-1] < losses[0]
        True
    """
    del seed  # the data order is the batches' order; kept for a stable signature
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, tokens):
        def loss_fn(p):
            return next_token_loss(nnx.merge(graphdef, p, rest), tokens)

        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    losses = []
    for i in range(steps):
        params, opt, loss = step(params, opt, jnp.asarray(batches[i % len(batches)]))
        losses.append(float(loss))
    nnx.update(model, params)
    return losses
