"""A user's own models for ``obcjax compress --model tests.cli_user_model:<factory>``.

Defined outside the package, the way a user would: small Linen and NNX MLPs on a fixed random
data set. Each factory returns what the command line's contract asks for (see
:func:`obcjax.cli.load_user_model`): ``(model, variables, batches)`` or, with an evaluation,
``(model, variables, batches, evaluate)``.

``evaluate`` is the agreement of the model's predicted class with the dense model's on held-out
inputs: 1.0 for the dense model by construction, a deterministic function of the compressed
weights otherwise (no training on the machine, nothing that round-off could flip by a margin).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

IN, HIDDEN, OUT = 16, 32, 4


def _data(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, IN)).astype(np.float32)


CALIB = _data(256, 0)
TEST = _data(512, 1)


class LinenMLP(nn.Module):
    """Three Dense layers."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(HIDDEN, name="fc1")(x))
        x = nn.relu(nn.Dense(HIDDEN, name="fc2")(x))
        return nn.Dense(OUT, name="fc3")(x)


class NNXMLP(nnx.Module):
    """The NNX twin of :class:`LinenMLP` (same paths: fc1, fc2, fc3)."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(IN, HIDDEN, rngs=rngs)
        self.fc2 = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
        self.fc3 = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x):
        return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def _batches():
    return [CALIB[i : i + 64] for i in range(0, len(CALIB), 64)]


def factory():
    """The Linen MLP, its variables, calibration batches and an evaluation."""
    model = LinenMLP()
    variables = model.init(jax.random.key(0), jnp.zeros((1, IN)))
    dense = np.asarray(jnp.argmax(model.apply(variables, TEST), -1))

    def evaluate(v) -> float:
        pred = np.asarray(jnp.argmax(model.apply(v, TEST), -1))
        return float(np.mean(pred == dense))

    return model, variables, _batches(), evaluate


def factory_nnx():
    """The NNX MLP with its own state (variables None), as ``(x, y)`` batches, with an
    evaluation that takes an ``nnx.State`` of the whole model."""
    model = NNXMLP(nnx.Rngs(0))
    graphdef = nnx.graphdef(model)
    dense = np.asarray(jnp.argmax(model(TEST), -1))

    def evaluate(state) -> float:
        pred = np.asarray(jnp.argmax(nnx.merge(graphdef, state)(TEST), -1))
        return float(np.mean(pred == dense))

    return model, None, [(b, None) for b in _batches()], evaluate


def factory_no_eval():
    """The Linen MLP without an evaluation (the 3-tuple form)."""
    return factory()[:3]


# Factories that break the contract, for the command line's one-line errors.
def factory_bad_tuple():
    return LinenMLP(), None


def factory_raises():
    raise RuntimeError("no data here")


def factory_not_a_model():
    return "mlp", {"params": {}}, _batches()


NOT_CALLABLE = 3
