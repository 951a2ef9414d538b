"""One table of bad inputs across the public API: each is refused up front with one clear error.

Every row is ``(id, action, error type, pattern)``: ``action(ctx)`` calls one public entry point
with one bad argument (the kernels, statistics and calibration, ``compress``, ``prune_levels``, the
database of levels, export, the command line); the error must be of that type and its message must
match the pattern, which names the argument (and the layer or file where there is one), what was
expected and what was given. No row may end in a bare built-in exception raised from inside a
dependency (``KeyError``, ``AttributeError``, ``IndexError``, ``ZeroDivisionError``,
``NotImplementedError``, ``BadZipFile``, LAPACK or XLA messages): the raising frame must be
obcjax's own code. Command-line rows check the exit status 2 and one line on stderr.

Shapes are tiny (8 columns), so the whole table runs in seconds once the few solver programs it
reaches have compiled. The file and fault-injection cases of export and the database (byte flips,
kills, full disks) are in ``tests/test_reliability.py``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import traceback
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from obcjax import allocation as A
from obcjax import cli
from obcjax import export as E
from obcjax import kernels as K
from obcjax import stats as S
from obcjax.calibration import calibrate, finalize
from obcjax.capture import CaptureError
from obcjax.fileio import CorruptedFileError
from obcjax.quant import QArray
from obcjax.specs import NM, Block, Int, Unstructured
from obcjax.transforms import compress, prune_levels


class Tiny(nn.Module):
    """A 2-group conv and two Dense layers: 18 / 32 / 8 input columns."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), feature_group_count=2, padding="SAME", name="conv")(x))
        x = nn.relu(nn.Dense(8, name="fc1")(x.reshape(x.shape[0], -1)[:, :32]))
        return nn.Dense(4, name="fc2")(x)


class Lin(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="fc")(x)


class Ctx:
    """What the rows act on (built once per module); ``tmp`` is the test's own folder."""

    tmp: os.PathLike


@pytest.fixture(scope="module")
def base():
    c = Ctx()
    rng = np.random.default_rng(0)
    c.model = Tiny()
    c.xs = [rng.normal(size=(8, 4, 4, 2)).astype(np.float32) for _ in range(2)]
    c.variables = c.model.init(jax.random.key(0), c.xs[0])
    c.params = c.variables["params"]
    c.stats = calibrate(c.model, c.variables, c.xs)
    X = rng.normal(size=(64, 8)).astype(np.float32)
    c.W = rng.normal(size=(4, 8)).astype(np.float32)
    c.H = X.T @ X / 64
    c.levels = [None, Unstructured(0.5), Int(4)]
    c.db = A.build_database(c.params, c.stats, c.levels, progress=False)
    return c


@pytest.fixture
def ctx(base, tmp_path):
    base.tmp = tmp_path
    return base


def _with(stats, path, **fields):
    return {**stats, path: stats[path]._replace(**fields)}


def _nan_sum(c, path="fc1"):
    return _with(c.stats, path, sum=c.stats[path].sum * np.nan)


def _no_tokens(c, path="fc2"):
    return _with(c.stats, path, count=jnp.zeros((), jnp.int32))


def _hessians(c):
    return {p: S.hessian_finalize(s)[0] for p, s in c.stats.items()}


def _params_without(c, path):
    return {k: v for k, v in c.params.items() if k != path}


def _compress(c, rules=None, stats=None, params=None, **kw):
    rules = [(".*", Unstructured(0.5))] if rules is None else rules
    return compress(c.params if params is None else params, c.stats if stats is None else stats,
                    rules, **kw)


def _levels(c, sparsities=(0.5,), stats=None, **kw):
    return prune_levels(c.params, c.stats if stats is None else stats, sparsities, **kw)


def _build(c, stats=None, levels=None, params=None, **kw):
    return A.build_database(
        c.params if params is None else params,
        c.stats if stats is None else stats,
        c.levels if levels is None else levels,
        progress=False,
        **kw,
    )


class CLIExit(Exception):
    """What ``obcjax.cli.main`` did: its exit status and its stderr lines."""

    def __init__(self, rc, lines):
        super().__init__("\n".join(lines))
        self.rc, self.lines = rc, lines


def _cli(c, *argv):
    argv = [a.replace("{tmp}", str(c.tmp)) for a in argv]
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse's own errors exit through SystemExit(2)
            rc = e.code
    raise CLIExit(rc, buf.getvalue().splitlines())


def _file(c, name, data: bytes):
    p = os.path.join(c.tmp, name)
    with open(p, "wb") as f:
        f.write(data)
    return p


M = "'<matrix>'"  # the kernels' default layer name

# (id, action(ctx), error type, pattern the message must match)
KERNELS = [
    ("prune-W-string", lambda c: K.exactobs_prune("abc", c.H, 0.5), TypeError,
     rf"layer {M}: W must be a real numeric array.*got 'abc'"),
    ("prune-W-None", lambda c: K.exactobs_prune(None, c.H, 0.5), TypeError,
     rf"layer {M}: W must be a real numeric array.*got None"),
    ("prune-W-complex", lambda c: K.exactobs_prune(c.W.astype(np.complex64), c.H, 0.5), TypeError,
     r"W must be a real numeric array.*complex64"),
    ("prune-W-ragged", lambda c: K.exactobs_prune([[1.0, 2.0], [3.0]], c.H, 0.5), TypeError,
     r"W must be a numeric array, got list"),
    ("prune-W-1d", lambda c: K.exactobs_prune(c.W[0], c.H, 0.5), ValueError,
     r"W must be a \(rows, cols\) matrix, got shape \(8,\)"),
    ("prune-W-no-rows", lambda c: K.exactobs_prune(c.W[:0], c.H, 0.5, layer="fc"), ValueError,
     r"layer 'fc': W is empty \(shape \(0, 8\)\); expected at least one row and one column"),
    ("prune-W-no-cols", lambda c: K.exactobs_prune(c.W[:, :0], c.H[:0, :0], 0.5), ValueError,
     r"W is empty \(shape \(4, 0\)\)"),
    ("prune-H-shape", lambda c: K.exactobs_prune(c.W, c.H[:4, :4], 0.5, layer="fc"), ValueError,
     r"layer 'fc': H must be \(cols, cols\) = \(8, 8\) to match W of shape \(4, 8\), got \(4, 4\)"),
    ("prune-H-string", lambda c: K.exactobs_prune(c.W, "H", 0.5), TypeError,
     r"H must be a real numeric array.*got 'H'"),
    ("prune-H-nan", lambda c: K.exactobs_prune(c.W, c.H * np.nan, 0.5, layer="fc"), ValueError,
     r"layer 'fc': H has 64 non-finite entries"),
    ("prune-H-zero", lambda c: K.exactobs_prune(c.W, c.H * 0, 0.5, layer="fc"), ValueError,
     r"layer 'fc': H has no signal"),
    ("prune-H-asymmetric", lambda c: K.exactobs_prune(c.W, c.H + np.triu(np.ones((8, 8))), 0.5),
     ValueError, r"H is not symmetric \(max \|H - Hᵀ\| = 1"),
    ("prune-H-indefinite", lambda c: K.exactobs_prune(c.W, -c.H, 0.5), ValueError,
     r"H is indefinite \(a diagonal entry is -"),
    ("prune-W-nan", lambda c: K.exactobs_prune(c.W * np.nan, c.H, 0.5), ValueError,
     r"W has 32 non-finite entries"),
    ("prune-sparsity-1", lambda c: K.exactobs_prune(c.W, c.H, 1.0, layer="fc"), ValueError,
     r"layer 'fc': sparsity must lie in \[0, 1\), got 1\.0"),
    ("prune-sparsity-dot", lambda c: K.exactobs_prune(c.W, c.H, "."), ValueError,
     r"sparsity: expected a sparsity in \[0, 1\).*got '\.'"),
    ("prune-sparsity-None", lambda c: K.exactobs_prune(c.W, c.H, None), ValueError,
     r"sparsity must be a fraction of zeros in \[0, 1\) or a list of them, got None"),
    ("prune-sparsity-empty", lambda c: K.exactobs_prune(c.W, c.H, []), ValueError,
     r"sparsity: an empty list of levels"),
    ("prune-method", lambda c: K.exactobs_prune(c.W, c.H, 0.5, method="left"), ValueError,
     r"method must be 'auto', 'fast', 'blocked' or 'naive', got 'left'"),
    ("prune-rel-damp", lambda c: K.exactobs_prune(c.W, c.H, 0.5, rel_damp=-1), ValueError,
     r"rel_damp must be a finite number >= 0, got -1"),
    ("nm-not-dividing", lambda c: K.exactobs_nm(c.W, c.H, "2:3", layer="fc"), ValueError,
     r"layer 'fc': N:M pattern 2:3 needs the input width to be a multiple of 3, but it has 8"),
    ("nm-n-above-m", lambda c: K.exactobs_nm(c.W, c.H, 5, 4), ValueError,
     r"NM: need 0 < n < m and m >= 2, got n=5, m=4"),
    ("nm-a-fraction", lambda c: K.exactobs_nm(c.W, c.H, 0.5), TypeError,
     r"expected an N:M pattern \(NM\(2, 4\), '2:4'\), got 0\.5"),
    ("nm-W-None", lambda c: K.exactobs_nm(None, c.H, "2:4"), TypeError,
     r"W must be a real numeric array.*got None"),
    ("block-size-0", lambda c: K.exactobs_block(c.W, c.H, 0.5, 0), ValueError,
     r"size must be a positive int \(the block width\), got 0"),
    ("block-not-dividing", lambda c: K.exactobs_block(c.W, c.H, 0.5, 3), ValueError,
     r"block pruning with blocks of 3 needs the input width to be a multiple of 3"),
    ("obq-bits-9", lambda c: K.obq_quantize(c.W, c.H, 9), ValueError,
     r"spec: expected a number of bits in 2\.\.8 .*got 9"),
    ("obq-bits-None", lambda c: K.obq_quantize(c.W, c.H, None), TypeError,
     r"spec: expected a number of bits in 2\.\.8 .*got None"),
    ("obq-order", lambda c: K.obq_quantize(c.W, c.H, 4, order="random", layer="fc"), ValueError,
     r"layer 'fc': order must be 'greedy' or 'natural', got 'random'"),
    ("joint-quant-None", lambda c: K.obq_prune_quantize(c.W, c.H, 0.5, None), TypeError,
     r"quant: expected a number of bits in 2\.\.8 .*got None"),
    ("joint-block-width", lambda c: K.obq_prune_quantize(c.W, c.H, Block(0.5, 3), 4), ValueError,
     r"block pruning with blocks of 3 needs the input width to be a multiple of 3"),
    ("gptq-bits-None", lambda c: K.gptq_quantize(c.W, c.H, None), TypeError,
     r"spec: expected a number of bits in 2\.\.8 .*got None"),
    ("gptq-blocksize", lambda c: K.gptq_quantize(c.W, c.H, 4, blocksize=0, layer="fc"),
     ValueError, r"layer 'fc': blocksize must be a positive int, got 0"),
    ("gptq-group-not-dividing",
     lambda c: K.gptq_quantize(c.W, c.H, Int(4, granularity="group", group_size=3)), ValueError,
     r"group size 3 does not divide the input width 8"),
    ("sparsegpt-block", lambda c: K.sparsegpt_prune(c.W, c.H, Block(0.5, 4)), TypeError,
     r"block pruning has no SparseGPT form"),
    ("sparsegpt-sparsity-dot", lambda c: K.sparsegpt_prune(c.W, c.H, "."), ValueError,
     r"prune: expected a sparsity in \[0, 1\).*got '\.'"),
    ("sparsegpt-W-empty", lambda c: K.sparsegpt_prune(c.W[:, :0], c.H[:0, :0], 0.5), ValueError,
     r"W is empty \(shape \(4, 0\)\)"),
    ("solve-nothing", lambda c: K.solve(c.W, c.H, layer="fc"), ValueError,
     r"layer 'fc': nothing to do \(no pruning and no quantization\)"),
    ("solve-solver", lambda c: K.solve(c.W, c.H, 0.5, None, "obs"), ValueError,
     r"solver must be one of \('obc', 'magnitude', 'gptq'\).*got 'obs'"),
    ("solve-W-None", lambda c: K.solve(None, c.H, 0.5), TypeError,
     r"W must be a real numeric array.*got None"),
    ("solve-magnitude-block", lambda c: K.solve(c.W, c.H, Block(0.5, 4), None, "magnitude"),
     ValueError, r"magnitude baseline has no block pruning"),
    ("prepare-rel-damp-nan", lambda c: K.prepare(c.W, c.H, rel_damp=float("nan")), ValueError,
     r"rel_damp must be a finite number >= 0, got nan"),
    ("magnitude-W-empty", lambda c: K.magnitude_prune(c.W[:0], 0.5), ValueError,
     r"W is empty \(shape \(0, 8\)\)"),
    ("rtn-bits-None", lambda c: K.rtn_quantize(c.W, None), TypeError,
     r"spec: expected a number of bits in 2\.\.8 .*got None"),
]

CALIBRATION = [
    ("calibrate-not-a-model", lambda c: calibrate(object(), c.variables, c.xs), TypeError,
     r"calibrate: model must be a flax\.linen\.Module or a flax\.nnx\.Module, got object"),
    ("calibrate-linen-no-variables", lambda c: calibrate(c.model, None, c.xs), TypeError,
     r"calibrate: a Linen model needs its variables"),
    ("calibrate-params-array", lambda c: calibrate(c.model, {"params": np.ones(3)}, c.xs),
     TypeError, r"calibrate: every collection of the Linen variables must be a nested dict.*"
     r"\{'params': 'ndarray'\}"),
    ("calibrate-missing-layer-params",
     lambda c: calibrate(c.model, {"params": _params_without(c, "fc2")}, c.xs), CaptureError,
     r"calibrate: layer 'fc2' needs the variable 'kernel' of the collection 'params', which the "
     r"variables do not have \(variables\['params'\] holds \['conv', 'fc1'\]\)"),
    ("calibrate-no-params", lambda c: calibrate(c.model, {}, c.xs), CaptureError,
     r"the model reads the collection 'params' .*e\.g\. \{'params': \.\.\.\}"),
    ("calibrate-empty", lambda c: calibrate(c.model, c.variables, []), ValueError,
     r"calibrate: batches is empty"),
    ("calibrate-batches-string", lambda c: calibrate(c.model, c.variables, "x.npy"), TypeError,
     r"calibrate: batches must be an iterable of batches .*got str 'x\.npy'"),
    ("calibrate-batch-dict-no-x", lambda c: calibrate(c.model, c.variables, [{"image": c.xs[0]}]),
     ValueError, r"calibrate: batch 0 is a dict without an 'x' entry \(keys \['image'\]\)"),
    ("calibrate-batch-wrong-width",
     lambda c: calibrate(Lin(), Lin().init(jax.random.key(0), np.ones((1, 3))), [np.ones((2, 5))]),
     CaptureError, r"calibrate: batch 0 \(leaf shapes \(2, 5\)\) did not run through the model"),
    ("calibrate-nan-batch", lambda c: calibrate(c.model, c.variables, [c.xs[0] * np.nan]),
     ValueError, r"calibrate: layer 'conv' \(the first in forward order\) got NaN or inf inputs "
     r"from batch 0"),
    ("calibrate-rule-no-match", lambda c: calibrate(c.model, c.variables, c.xs, rules=["fc9"]),
     ValueError, r"layer rule 'fc9' matches no layer.*'conv', 'fc1', 'fc2'"),
    ("calibrate-rule-bad-regex", lambda c: calibrate(c.model, c.variables, c.xs, rules=["fc["]),
     ValueError, r"layer rule 'fc\[' is not a valid regular expression"),
    ("calibrate-layer-type", lambda c: calibrate(c.model, c.variables, c.xs, layer_types=["Lstm"]),
     ValueError, r"calibrate: unknown layer type 'Lstm'; known: \["),
    ("calibrate-forward-and-kwargs",
     lambda c: calibrate(c.model, c.variables, c.xs, forward=lambda m, b: m(b),
                         apply_kwargs={"train": False}), ValueError,
     r"calibrate: give either forward= or apply_kwargs=, not both"),
    ("calibrate-forward-not-callable",
     lambda c: calibrate(c.model, c.variables, c.xs, forward="apply"), TypeError,
     r"calibrate: forward must be a function forward\(module, batch\), got str"),
    ("calibrate-zero-features",
     lambda c: calibrate(Lin(), {"params": {"fc": {"kernel": np.zeros((0, 4), np.float32),
                                                   "bias": np.zeros(4, np.float32)}}},
                         [np.ones((2, 0), np.float32)]),
     CaptureError, r"layer 'fc': its input has no features \(input shape \(2, 0\)"),
    ("finalize-not-a-mapping", lambda c: finalize([c.stats["fc1"]]), TypeError,
     r"finalize: stats must be a mapping \{layer path: HessianState\}.*got a list"),
    ("finalize-nan", lambda c: finalize(_nan_sum(c)), ValueError,
     r"layer 'fc1': the accumulated statistics contain NaN or inf"),
    ("finalize-no-tokens", lambda c: finalize(_no_tokens(c)), ValueError,
     r"layer 'fc2': no token was accumulated \(count = 0\)"),
    ("hessian-finalize-array", lambda c: S.hessian_finalize(c.H, layer="fc1"), TypeError,
     r"layer 'fc1': statistics: expected a HessianState\(sum, count\) from "
     r"obcjax\.calibration\.calibrate, got an array of shape \(8, 8\) \(float32\) \(a finalized "
     r"Hessian\?\)"),
    ("hessian-finalize-tuple", lambda c: S.hessian_finalize((c.H, 3)), TypeError,
     r"statistics: expected a HessianState\(sum, count\).*got a tuple"),
    ("hessian-init-cols-0", lambda c: S.hessian_init(0), ValueError,
     r"hessian_init: cols and groups must be >= 1, got cols=0"),
    ("hessian-init-cols-float", lambda c: S.hessian_init(7.5), TypeError,
     r"hessian_init: cols must be an int >= 1, got 7\.5"),
    ("hessian-update-width", lambda c: S.hessian_update(S.hessian_init(8), np.ones((3, 5))),
     ValueError, r"hessian_update: x of shape \(3, 1, 5\) does not fit a state of 1 group\(s\) of "
     r"width 8"),
    ("hessian-update-not-a-state", lambda c: S.hessian_update(c.H, np.ones((3, 8))), TypeError,
     r"statistics: expected a HessianState\(sum, count\).*array of shape \(8, 8\)"),
    ("hessian-update-strings", lambda c: S.hessian_update(S.hessian_init(3), [["a", "b", "c"]]),
     TypeError, r"hessian_update: x must be a real numeric array, got a list"),
    ("dense-inputs-scalar", lambda c: S.dense_inputs(np.float32(1)), ValueError,
     r"dense_inputs: a Dense input needs a feature axis, got a scalar"),
    ("conv-patches-channels", lambda c: S.conv_patches(np.ones((1, 4, 4, 3)), (3, 3, 2, 4)),
     ValueError, r"conv_patches: 3 input channels in 1 group\(s\) do not fit a kernel of shape "
     r"\(3, 3, 2, 4\) \(expected in/G = 2\)"),
    ("conv-patches-kernel-shape", lambda c: S.conv_patches(np.ones((1, 4, 4, 3)), None), TypeError,
     r"conv_patches: kernel_shape must be a sequence of ints .*got None"),
]

COMPRESS = [
    ("compress-hessian-arrays", lambda c: _compress(c, stats=_hessians(c)), TypeError,
     r"compress: layer 'conv': statistics: expected a HessianState\(sum, count\) from "
     r"obcjax\.calibration\.calibrate, got an array of shape \(9, 9\) \(float32\) \(a finalized "
     r"Hessian\?\)"),
    ("compress-stats-None", lambda c: compress(c.params, None, [(".*", Unstructured(0.5))]),
     TypeError,
     r"compress: stats must be a mapping \{layer path: HessianState\}.*got NoneType None"),
    ("compress-stats-missing-layer",
     lambda c: _compress(c, stats={"conv": c.stats["conv"], "fc1": c.stats["fc1"]}), ValueError,
     r"compress: no calibration statistics for layer\(s\) \['fc2'\]; the statistics hold "
     r"\['conv', 'fc1'\]"),
    ("compress-stats-dicts",
     lambda c: _compress(c, stats={p: dict(s._asdict()) for p, s in c.stats.items()}), TypeError,
     r"compress: layer 'conv': statistics: expected a HessianState.*got a dict with keys "
     r"\['count', 'sum'\]"),
    ("compress-stats-nan", lambda c: _compress(c, stats=_nan_sum(c)), ValueError,
     r"layer 'fc1': the accumulated statistics contain NaN or inf"),
    ("compress-stats-no-tokens", lambda c: _compress(c, stats=_no_tokens(c)), ValueError,
     r"layer 'fc2': no token was accumulated \(count = 0\)"),
    ("compress-stats-wrong-width",
     lambda c: _compress(c, stats={**c.stats, "fc1": c.stats["fc2"]}), ValueError,
     r"layer 'fc1': kernel of shape \(32, 8\) does not match its statistics \(1 group\(s\) of "
     r"width 8\)"),
    ("compress-variables-not-params", lambda c: compress(c.variables, c.stats,
                                                         [(".*", Unstructured(0.5))]),
     ValueError, r"compress: no calibration statistics for layer\(s\) \['params/conv'"),
    ("compress-missing-layer-params",
     lambda c: _compress(c, params=_params_without(c, "fc2"), rules=[("fc2", Unstructured(0.5))]),
     ValueError, r"layer rule 'fc2' matches no layer .*available layer paths: \['conv', 'fc1'\]"),
    ("compress-empty-kernel",
     lambda c: _compress(c, params={**c.params, "fc2": {"kernel": np.zeros((8, 0), np.float32)}}),
     ValueError, r"compress: layer 'fc2': kernel is empty \(shape \(8, 0\)\)"),
    ("compress-rules-string", lambda c: compress(c.params, c.stats, "0.5"), TypeError,
     r"compress: rules must be a list of \(regex, spec\) pairs or a dict \{regex: spec\}, got "
     r"str '0\.5'"),
    ("compress-rule-not-pair", lambda c: _compress(c, rules=[(".*",)]), TypeError,
     r"compress: rules\[0\] must be a \(regex, spec\) pair, got a tuple of length 1"),
    ("compress-spec-dot", lambda c: _compress(c, rules=[(".*", ".")]), (TypeError, ValueError),
     r"compress: layer 'conv': the rule value str '\.' is not a layer spec"),
    ("compress-spec-object", lambda c: _compress(c, rules=[(".*", object())]), TypeError,
     r"compress: layer 'conv': the rule value object .* is not a layer spec"),
    ("compress-spec-0d-array", lambda c: _compress(c, rules=[(".*", np.array(1.5))]),
     (TypeError, ValueError), r"compress: layer 'conv': the rule value a 0-d array 1\.5"),
    ("compress-nm-not-dividing", lambda c: _compress(c, rules=[(".*", NM(3, 5))]), ValueError,
     r"layer 'conv\[group 0\]': N:M pattern 3:5 needs the input width to be a multiple of 5, but "
     r"it has 9 columns"),
    ("compress-rel-damp-string", lambda c: _compress(c, rel_damp="0.01"), TypeError,
     r"compress: rel_damp must be a finite number >= 0 \(e\.g\. 0\.01\), got str '0\.01'"),
    ("compress-rel-damp-negative", lambda c: _compress(c, rel_damp=-1.0), ValueError,
     r"compress: rel_damp must be a finite number >= 0 \(e\.g\. 0\.01\), got -1\.0"),
    ("compress-solver", lambda c: _compress(c, solver="obs"), ValueError,
     r"compress: solver must be one of \('obc', 'magnitude', 'gptq'\).*got 'obs'"),
    ("compress-dead-inputs", lambda c: _compress(c, dead_inputs="drop"), ValueError,
     r"compress: dead_inputs must be 'zero' or 'keep', got 'drop'"),
    ("compress-kernel-nan",
     lambda c: _compress(c, params={**c.params, "fc1": {
         "kernel": np.full((32, 8), np.nan, np.float32), "bias": c.params["fc1"]["bias"]}},
         rules=[("fc1", Unstructured(0.5))]), ValueError,
     r"layer 'fc1': W has 256 non-finite entries"),
]

PRUNE_LEVELS = [
    ("levels-stats-missing-layer",
     lambda c: _levels(c, stats={"conv": c.stats["conv"], "fc1": c.stats["fc1"]}), ValueError,
     r"prune_levels: no calibration statistics for layer\(s\) \['fc2'\]; the statistics hold "
     r"\['conv', 'fc1'\]"),
    ("levels-hessian-arrays", lambda c: _levels(c, stats=_hessians(c)), TypeError,
     r"prune_levels: layer 'conv': statistics: expected a HessianState\(sum, count\) from "
     r"obcjax\.calibration\.calibrate, got an array of shape \(9, 9\)"),
    ("levels-stats-None", lambda c: prune_levels(c.params, None, [0.5]), TypeError,
     r"prune_levels: stats must be a mapping \{layer path: HessianState\}.*got NoneType None"),
    ("levels-stats-nan", lambda c: _levels(c, stats=_nan_sum(c)), ValueError,
     r"layer 'fc1': the accumulated statistics contain NaN or inf"),
    ("levels-0d-array", lambda c: _levels(c, np.array(0.5)), TypeError,
     r"prune_levels: sparsities must be a list of unstructured sparsities in \[0, 1\) \(e\.g\. "
     r"\[0\.5, 0\.7\]\), got a 0-d array 0\.5; wrap a single level in a list"),
    ("levels-string", lambda c: _levels(c, "0.5"), TypeError,
     r"prune_levels: sparsities must be a list .*got str '0\.5'"),
    ("levels-dot", lambda c: _levels(c, ["."]), ValueError,
     r"prune_levels: sparsities\[0\]: expected a sparsity in \[0, 1\).*got '\.'"),
    ("levels-nm", lambda c: _levels(c, [0.5, "2:4"]), ValueError,
     r"prune_levels: sparsities\[1\]: expected an unstructured sparsity in \[0, 1\).*got '2:4' "
     r"\(NM\)"),
    ("levels-one", lambda c: _levels(c, [1.0]), ValueError,
     r"prune_levels: sparsities\[0\]: expected a sparsity in \[0, 1\).*got 1\.0"),
    ("levels-empty", lambda c: _levels(c, []), ValueError,
     r"prune_levels: sparsities is empty; give at least one sparsity in \[0, 1\)"),
    ("levels-solver", lambda c: _levels(c, solver="gptq"), ValueError,
     r"prune_levels: solver must be 'obc' or 'magnitude', got 'gptq'"),
    ("levels-rel-damp", lambda c: _levels(c, rel_damp=float("inf")), ValueError,
     r"prune_levels: rel_damp must be a finite number >= 0 \(e\.g\. 0\.01\), got inf"),
]

DATABASE = [
    ("db-stats-None", lambda c: A.build_database(c.params, None, c.levels, progress=False),
     TypeError,
     r"build_database: stats must be a mapping \{layer path: HessianState\}.*got NoneType None"),
    ("db-stats-missing-layer", lambda c: _build(c, stats={"fc1": c.stats["fc1"]}), ValueError,
     r"build_database: no calibration statistics for layer\(s\) \['conv', 'fc2'\]; the statistics "
     r"hold \['fc1'\]"),
    ("db-stats-strings", lambda c: _build(c, stats={p: "H.npy" for p in c.stats}), TypeError,
     r"build_database: layer 'conv': statistics: expected a HessianState\(sum, count\) from "
     r"obcjax\.calibration\.calibrate or a Hessian array.*got str 'H\.npy'"),
    ("db-stats-nan", lambda c: _build(c, stats=_nan_sum(c)), ValueError,
     r"layer 'fc1': the accumulated statistics contain NaN or inf"),
    ("db-levels-string", lambda c: _build(c, levels="0.5"), TypeError,
     r"build_database: levels must be a list of level specs, got '0\.5'"),
    ("db-levels-empty", lambda c: _build(c, levels=[]), ValueError,
     r"build_database: the list of levels is empty"),
    ("db-rule-value", lambda c: _build(c, rules=[(".*", 0.5)]), TypeError,
     r"build_database: rule value for layer 'conv' must be True, None or a list of levels, got 0\.5"),
    ("db-rel-damp", lambda c: _build(c, rel_damp="x"), TypeError,
     r"build_database: rel_damp must be a finite number >= 0 \(e\.g\. 0\.01\), got str 'x'"),
    ("db-empty-kernel",
     lambda c: _build(c, params={**c.params, "fc2": {"kernel": np.zeros((8, 0), np.float32)}}),
     ValueError, r"build_database: layer 'fc2': kernel is empty \(shape \(8, 0\)\)"),
    ("db-path-is-file", lambda c: _build(c, path=_file(c, "db", b"x")), NotADirectoryError,
     r"build_database: path '.*db' is an existing file, not a folder"),
    ("db-positions", lambda c: _build(c, positions={"fc1": 0}), ValueError,
     r"build_database: positions\['fc1'\] must be a positive int, got 0"),
    ("db-error", lambda c: _build(c, error="mse"), ValueError,
     r"build_database: error must be 'obs', 'relative' or 'squared' .*got 'mse'"),
    ("db-member-flipped", lambda c: _damaged_db(c), CorruptedFileError,
     r"layer 'fc1'.*fc1\.npz"),
    ("solve-database-None", lambda c: A.solve(None, 1e9), TypeError,
     r"solve: database must be a Database \(from build_database or Database\.from_table\), got "
     r"NoneType"),
    ("solve-budget-string", lambda c: A.solve(c.db, "lots"), TypeError,
     r"budget must be a number, got 'lots'"),
    ("solve-budget-too-small", lambda c: A.solve(c.db, 1), ValueError,
     r"solve: budget 1 \(size\) is below the smallest reachable cost"),
    ("solve-metric", lambda c: A.solve(c.db, 1e9, metric="latency"), ValueError,
     r"metric must be one of \('size', 'bops', 'flops'\), got 'latency'"),
    ("uniform-database-dict", lambda c: A.uniform({"fc1": 1}, 1e9), TypeError,
     r"uniform: database must be a Database .*got dict"),
    ("materialize-missing-layer",
     lambda c: A.materialize(c.params, c.db, {"conv": None, "fc1": Unstructured(0.5)}), ValueError,
     r"assignment has no level for layer\(s\) \['fc2'\]"),
    ("materialize-level-not-in-db",
     lambda c: A.materialize(c.params, c.db, {"conv": None, "fc1": NM(2, 4), "fc2": None}),
     ValueError, r"layer 'fc1': level '2:4' .* is not in the database; its levels are \['dense', "
     r"'50%', 'w4'\]"),
    ("materialize-database-None", lambda c: A.materialize(c.params, None, {}), TypeError,
     r"materialize: database must be a Database .*got NoneType"),
    ("database-unknown-layer", lambda c: c.db.levels("fc9"), ValueError,
     r"layer 'fc9' is not in the database; its layers are \['conv', 'fc1', 'fc2'\]"),
]


def _damaged_db(c):
    root = os.path.join(c.tmp, "db")
    _build(c, path=root)
    fname = os.path.join(root, "fc1.npz")
    with zipfile.ZipFile(fname) as z:
        names = z.namelist()
    member = next(n for n in names if "weights" in n)
    with zipfile.ZipFile(fname) as z:
        info = z.getinfo(member)
    data = bytearray(open(fname, "rb").read())
    data[info.header_offset + 30 + len(info.filename) + info.compress_size - 3] ^= 0xFF
    with open(fname, "wb") as f:
        f.write(bytes(data))
    return _build(c, path=root)


def _q():
    return QArray(np.zeros((4, 8), np.uint8), np.ones((4, 1), np.float32),
                  np.zeros((4, 1), np.float32), 4, 8)


EXPORT = [
    ("pack-qarray-string", lambda c: E.pack_layer(c.W, qarray="codes", name="fc"), TypeError,
     r"layer 'fc': qarray must be an obcjax\.quant\.QArray .*got str"),
    ("pack-mask-shape", lambda c: E.pack_layer(c.W, mask=np.ones((4, 4), bool), name="fc"),
     ValueError, r"layer 'fc': mask shape \(4, 4\) != weights shape \(4, 8\)"),
    ("pack-nm-not-kept", lambda c: E.pack_layer(c.W, mask=np.ones((4, 8), bool), nm=(2, 4),
                                                name="fc"),
     ValueError, r"layer 'fc': N:M 2:4 keeps exactly 2 of every 4 weights"),
    ("pack-strings", lambda c: E.pack_layer(np.array([["a"]]), name="fc"), TypeError,
     r"layer 'fc': weights must be numeric, got dtype <U1"),
    ("save-params-None", lambda c: E.save_params(os.path.join(c.tmp, "m.safetensors"), None),
     TypeError, r"params must be nested dicts of arrays, got NoneType"),
    ("save-params-int-key",
     lambda c: E.save_params(os.path.join(c.tmp, "m.safetensors"), {1: {"kernel": c.W}}),
     ValueError, r"params: key 1 under '<root>' must be a non-empty str without '/'"),
    ("save-params-packed-not-a-leaf",
     lambda c: E.save_params(os.path.join(c.tmp, "m.safetensors"), c.params,
                             {"fc9/kernel": E.pack_layer(c.W)}), ValueError,
     r"save_params: packed layer\(s\) \['fc9/kernel'\] are not leaves of params"),
    ("save-missing-folder",
     lambda c: E.save_params(os.path.join(c.tmp, "no", "m.safetensors"), c.params),
     FileNotFoundError, r"cannot write .*no/m\.safetensors'.*does not exist"),
    ("load-path-None", lambda c: E.load(None), TypeError,
     r"the path must be a str or os\.PathLike, got NoneType"),
    ("load-garbage", lambda c: E.load_params(_file(c, "g.safetensors", b"\x08\x00garbage")),
     CorruptedFileError, r"g\.safetensors.*truncated or corrupted"),
    ("load-text-file", lambda c: E.load(_file(c, "t.safetensors", b"hello world, not a model")),
     CorruptedFileError, r"t\.safetensors"),
]

CLI = [
    ("cli-prune", lambda c: _cli(c, "compress", "--prune", "half", "--out", "{tmp}/o"), CLIExit,
     r"^obcjax: error: --prune: .*2:4.*got 'half'"),
    ("cli-wbits", lambda c: _cli(c, "compress", "--wbits", "16", "--out", "{tmp}/o"), CLIExit,
     r"^obcjax: error: --wbits: .*2\.\.8"),
    ("cli-rel-damp", lambda c: _cli(c, "compress", "--rel-damp", "-0.5", "--out", "{tmp}/o"),
     CLIExit, r"^obcjax: error: --rel-damp: .*>= 0"),
    ("cli-sweep", lambda c: _cli(c, "compress", "--sweep", "0.5,1.5", "--out", "{tmp}/o"),
     CLIExit, r"^obcjax: error: --sweep: .*\[0, 1\)"),
    ("cli-model", lambda c: _cli(c, "compress", "--model", "vgg16", "--out", "{tmp}/o"), CLIExit,
     r"^obcjax: error: --model: .*lenet5"),
    ("cli-budget", lambda c: _cli(c, "compress", "--budget", "fast", "--out", "{tmp}/o"), CLIExit,
     r"^obcjax: error: --budget: .*bops=8x"),
    ("cli-save-folder-missing",
     lambda c: _cli(c, "compress", "--save", "{tmp}/no/m.safetensors", "--out", "{tmp}/o"),
     CLIExit, r"^obcjax: error: --save: .*does not exist"),
    ("cli-evaluate-missing-file",
     lambda c: _cli(c, "evaluate", "--load", "{tmp}/missing.safetensors"), CLIExit,
     r"^obcjax: error: --load: .*no such file"),
    ("cli-evaluate-damaged-file",
     lambda c: (_file(c, "bad.safetensors", b"\x10\x00\x00garbage"),
                _cli(c, "evaluate", "--load", "{tmp}/bad.safetensors")), CLIExit,
     r"^obcjax: error: --load: .*bad\.safetensors"),
    ("cli-unknown-command", lambda c: _cli(c, "prune"), CLIExit,
     r"^obcjax: error: .*compress"),
]

AREAS = {
    "kernels": KERNELS,
    "calibration": CALIBRATION,
    "compress": COMPRESS,
    "prune_levels": PRUNE_LEVELS,
    "database": DATABASE,
    "export": EXPORT,
    "cli": CLI,
}
ROWS = [(f"{area}:{row[0]}", *row[1:]) for area, rows in AREAS.items() for row in rows]

# Built-in exception types that mean "an unchecked input reached code that did not expect it".
_BARE = (KeyError, AttributeError, IndexError, ZeroDivisionError, NotImplementedError,
         zipfile.BadZipFile, UnboundLocalError, RecursionError)
_OBCJAX = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))


def test_the_table_is_large_enough():
    assert len(ROWS) >= 80
    assert len({r[0] for r in ROWS}) == len(ROWS)
    assert all(len(rows) >= 5 for rows in AREAS.values())


@pytest.mark.parametrize("action, exc, pattern", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input(ctx, action, exc, pattern):
    with pytest.raises(Exception) as info:
        action(ctx)
    e = info.value
    assert isinstance(e, exc), f"{type(e).__name__}: {e}"
    if isinstance(e, CLIExit):
        assert e.rc == 2, (e.rc, e.lines)
        assert len(e.lines) == 1 and "Traceback" not in e.lines[0], e.lines
    else:
        assert not isinstance(e, _BARE), f"bare {type(e).__name__}: {e}"
        frame = traceback.extract_tb(e.__traceback__)[-1]
        inside = os.path.abspath(frame.filename).startswith(os.path.join(_OBCJAX, "obcjax"))
        assert inside, f"raised from {frame.filename}:{frame.lineno}: {type(e).__name__}: {e}"
    message = str(e)
    assert "\n" not in message.strip() or isinstance(e, CLIExit), message
    assert re.search(pattern, message), f"{type(e).__name__}: {message}"
