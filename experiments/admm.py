"""Progressive ADMM vs one-shot ADMM vs magnitude pruning + retraining on LeNet-5 / digits.

Claims checked (joint-methods.md §3.9), written to ``<out>/admm.json`` and ``<out>/admm.png``:

1. At rising pruning rates, progressive ADMM (one stage per rate, warm-started, zeros frozen)
   against one-shot ADMM and magnitude pruning + masked retraining, each at the *same total
   epochs* as the progressive run has spent when it reaches that rate.
2. A fully binarized LeNet-5 (every layer, first and last included): progressive (middle layers
   first, then all) vs one-shot ADMM vs sign() + retraining of the biases.

Layer targets: ``conv1`` (54 weights) stays dense, ``fc3`` is capped at 80 % sparsity, every other
kernel gets the stage's rate (the ECCV'18 LeNet-5 recipe also prunes first and last layers less).
Reported sparsity counts all kernels. Adam is the inner optimizer of both phases, its learning
rate reset at every stage. ``--quick`` uses fewer rates and epochs.

    python experiments/admm.py --out runs/admm [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _targets(rate: float):
    from obcjax.specs import Unstructured

    return [("conv1", None), ("fc3", Unstructured(min(rate, 0.8))), (".*", Unstructured(rate))]


def run(quick: bool, log, rho: float = 0.03) -> dict:
    from obcjax import admm as A
    from obcjax.zoo import data as zdata
    from obcjax.zoo import train as ztrain

    name, dataset = "lenet5", "digits"
    ds = zdata.load_dataset(dataset)
    variables, _ = ztrain.pretrained(name, dataset)
    dense = float(ztrain.evaluate(name, variables, ds["test"])["accuracy"])
    log(f"dense test accuracy {dense:.4f}")
    rates = [0.8, 0.9, 0.95] if quick else [0.8, 0.9, 0.95, 0.97, 0.98, 0.99]
    a_ep, r_ep = (2, 2) if quick else (4, 4)
    common = dict(rho=rho, rho_growth=1.3, lr=3e-3, retrain_lr=3e-3, batch_size=32)
    schedule = [_targets(r) for r in rates]

    t0 = time.perf_counter()
    _, prog = A.progressive_admm(
        name, variables, ds, schedule, admm_epochs=a_ep, retrain_epochs=r_ep,
        updates_per_stage=4, **common,
    )  # fmt: skip
    log(f"progressive done ({time.perf_counter() - t0:.0f}s)")
    rows = []
    for t, (rate, rec) in enumerate(zip(rates, prog, strict=True), start=1):
        _, one = A.progressive_admm(
            name, variables, ds, [schedule[t - 1]], admm_epochs=t * a_ep,
            retrain_epochs=t * r_ep, updates_per_stage=4 * t, **common,
        )  # fmt: skip
        _, mag = A.progressive_admm(
            name, variables, ds, [schedule[t - 1]], admm_epochs=0,
            retrain_epochs=t * (a_ep + r_ep), **common,
        )  # fmt: skip
        row = {
            "rate": rate,
            "sparsity": rec["sparsity"],
            "compression": rec["compression"],
            "epochs": t * (a_ep + r_ep),
            "progressive": rec["acc"],
            "progressive_projected": rec["acc_projected"],
            "one_shot": one[0]["acc"],
            "one_shot_projected": one[0]["acc_projected"],
            "magnitude": mag[0]["acc"],
            "magnitude_projected": mag[0]["acc_projected"],
            "primal_progressive": rec["primal"],
            "primal_one_shot": one[0]["primal"],
        }
        rows.append(row)
        log(
            f"rate {rate:.2f} (sparsity {row['sparsity']:.4f}, {row['compression']:.1f}x, "
            f"{row['epochs']} ep): progressive {row['progressive']:.4f} one-shot "
            f"{row['one_shot']:.4f} magnitude {row['magnitude']:.4f}"
        )

    def best_rate(key):
        ok = [r["sparsity"] for r in rows if r[key] >= dense - 0.01]
        return max(ok) if ok else None

    summary = {k: best_rate(k) for k in ("progressive", "one_shot", "magnitude")}
    log(f"highest sparsity within 1 point of dense: {summary}")

    # Fully binarized: middle layers first, then all layers (the order is [recalled - verify]).
    middle = [("conv1", None), ("fc3", None), (".*", A.Binary())]
    full = [(".*", A.Binary())]
    t0 = time.perf_counter()
    _, bprog = A.progressive_admm(
        name, variables, ds, [middle, full], admm_epochs=a_ep, retrain_epochs=r_ep,
        updates_per_stage=4, **common,
    )  # fmt: skip
    _, bone = A.progressive_admm(
        name, variables, ds, [full], admm_epochs=2 * a_ep, retrain_epochs=2 * r_ep,
        updates_per_stage=8, **common,
    )  # fmt: skip
    _, bsign = A.progressive_admm(
        name, variables, ds, [full], admm_epochs=0, retrain_epochs=2 * (a_ep + r_ep), **common
    )
    binary = {
        "progressive": bprog[-1]["acc"],
        "progressive_middle_only": bprog[0]["acc"],
        "one_shot": bone[0]["acc"],
        "sign_retrain": bsign[0]["acc"],
        "levels_per_layer": {k: v for k, v in bprog[-1].items() if k.endswith("/levels")},
    }
    log(f"binary ({time.perf_counter() - t0:.0f}s): {binary}")
    return {
        "model": name,
        "dataset": dataset,
        "dense": dense,
        "settings": {"admm_epochs": a_ep, "retrain_epochs": r_ep, **common},
        "pruning": rows,
        "progressive_stages": prog,
        "highest_sparsity_within_1pt": summary,
        "binary": binary,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["pruning"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["compression"] for r in rows]
    for key, style in (("progressive", "o-"), ("one_shot", "s--"), ("magnitude", "^:")):
        ax.plot(x, [r[key] for r in rows], style, label=key.replace("_", "-"))
    ax.axhline(results["dense"], color="k", lw=0.8, label="dense")
    ax.axhline(results["dense"] - 0.01, color="k", lw=0.5, ls="--", label="dense - 1 pt")
    ax.set_xscale("log")
    ax.set_xlabel("compression (kernel weights / nonzeros)")
    ax.set_ylabel("test accuracy")
    ax.set_title("LeNet-5 / digits: pruning at equal epochs")
    ax.legend(fontsize=8)
    b = results["binary"]
    keys = ["progressive", "one_shot", "sign_retrain"]
    bx.bar(keys, [b[k] for k in keys], color=["C0", "C1", "C2"])
    bx.axhline(results["dense"], color="k", lw=0.8)
    bx.set_ylim(0, 1)
    bx.set_title("fully binarized LeNet-5")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/admm")
    ap.add_argument("--quick", action="store_true", help="fewer rates and epochs (CI)")
    ap.add_argument("--rho", type=float, default=0.03, help="initial ADMM penalty")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    results = run(args.quick, log, rho=args.rho)
    results["seconds"] = time.perf_counter() - t0
    (out / "admm.json").write_text(json.dumps(results, indent=2, default=str))
    plot(results, out / "admm.png")
    log(f"wrote {out / 'admm.json'} and {out / 'admm.png'}")


if __name__ == "__main__":
    main()
