"""Slow float64 NumPy references for the statistics tests (shared by test_stats, test_calibration)."""

import itertools

import numpy as np


def np_patches(x, ks, strides, pads, dil, groups):
    """Loop-by-loop float64 im2col: ``(tokens, groups, cols)``, columns ``(kh, kw, cin_in_group)``
    per group, for a channels-last input ``x`` and a conv with kernel sizes ``ks``."""
    x = np.asarray(x, np.float64)
    xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    cg = x.shape[-1] // groups
    eff = [(k - 1) * d + 1 for k, d in zip(ks, dil)]
    outs = [(n - e) // s + 1 for n, e, s in zip(xp.shape[1:-1], eff, strides)]
    rows = []
    for n in range(x.shape[0]):
        for o in itertools.product(*(range(m) for m in outs)):
            row = []
            for g in range(groups):
                taps = [
                    xp[(n, *(oi * s + t * d for oi, s, t, d in zip(o, strides, tap, dil)))][
                        g * cg : (g + 1) * cg
                    ]
                    for tap in itertools.product(*(range(k) for k in ks))
                ]
                row.append(np.concatenate(taps))
            rows.append(np.stack(row))
    return np.stack(rows)
