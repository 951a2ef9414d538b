"""OBQ with group-wise grids works group by group, and so at least matches GPTQ (issue 20, item 5).

A greedy OBQ pass across all columns, with a grid per group of 32 (or 128) columns fixed before
the sweep, lost to GPTQ: on MiniLM's 24 attention matrices at 4-bit g128 its layer loss was 12 %
above GPTQ's (and the encoder's cosine 0.988 against 0.994). The cause is the order, not the grid:
the greedy finishes every group at about the same time, near the end of the sweep, when the last
weights of each group have only the few free weights left elsewhere to absorb their error.
Confining the greedy to the first group that still has free columns (groups left to right, the
grids still fixed before the sweep) gives every group but the last the whole rest of the row to
compensate into; recomputing a group's grid on the compensated weights when its first column is
reached (GPTQ's default) changed the MiniLM losses by < 1 % either way.

Checked here on fixed synthetic layers in float64 with GPTQ's grid (asymmetric, min-max, groups
of 32 of 128 columns), summed over 8 problems so that no single rounding decision matters (the
measured ratios are in the comments): the grouped greedy beats the across-groups greedy (the
float64 NumPy reference with ``across_groups=True``) by a wide margin, the across-groups greedy
loses to GPTQ, and the grouped greedy does not. That the kernel implements the grouped rule
exactly is checked against the same reference in ``test_obq.py`` (group cases).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from obcjax.kernels import gptq_quantize, obq_quantize
from obcjax.specs import Int
from tests.kernels.reference import make_problem, obq_ref

SPEC = Int(4, sym=False, search="minmax", granularity="group", group_size=32)  # GPTQ's grid
SEEDS = range(8)


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def test_group_by_group_obq_beats_across_groups_and_matches_gptq():
    grouped = gptq = across = 0.0
    for seed in SEEDS:
        W, H = make_problem(16, 128, seed, decay=0.9)
        grouped += float(obq_quantize(W, H, SPEC, method="naive").loss)
        gptq += float(gptq_quantize(W, H, SPEC).loss)
        across += float(obq_ref(W, H, SPEC, across_groups=True).loss)
    # measured: grouped / across = 0.83
    assert grouped < 0.9 * across
    # measured: across / gptq = 1.17: the old rule lost to GPTQ ...
    assert across > 1.1 * gptq
    # ... measured: grouped / gptq = 0.97: the grouped rule does not
    assert grouped < gptq


def test_reference_greedy_finishes_each_group_before_the_next():
    W, H = make_problem(4, 64, 0, decay=0.9)
    R = obq_ref(W, H, SPEC)
    assert np.all(np.diff(R.order // SPEC.group_size, axis=1) >= 0)
    R_across = obq_ref(W, H, SPEC, across_groups=True)
    assert np.any(np.diff(R_across.order // SPEC.group_size, axis=1) < 0)
