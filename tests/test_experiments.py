"""The experiments' CI modes run end to end and their results still show the paper's claims.

Each experiment in ``experiments/`` has a ``--smoke`` mode (the smallest settings, what CI runs):
it trains or loads the zoo model, calibrates, compresses, evaluates and writes its JSON and PNG.
The checks below are the claims that hold by a wide margin even at smoke size, so a regression
in a solver or in the plumbing fails them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _experiment(name: str):
    spec = importlib.util.spec_from_file_location(f"exp_{name}", ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_obc_claims_smoke(tmp_path):
    assert _experiment("obc_claims").main(["--smoke", "--out", str(tmp_path)]) == 0
    (r,) = json.loads((tmp_path / "obc_claims.json").read_text())
    assert (tmp_path / "obc_claims.png").stat().st_size > 0
    dense = r["dense_accuracy"]
    assert dense > 0.95
    prune = r["prune"]
    i70 = prune["sparsity"].index(0.7)
    # claim 1: ExactOBS keeps 70% sparsity near dense where magnitude pruning collapses
    assert prune["accuracy"]["obc"][i70] > dense - 0.03
    assert prune["accuracy"]["obc"][i70] > prune["accuracy"]["magnitude"][i70] + 0.1
    # claim 2: OBQ at 4 bits within a point of dense, and not worse than round-to-nearest
    quant = r["quant"]
    i4 = quant["bits"].index(4)
    # (accuracies of a model trained on this machine move by an image or two from machine to
    # machine, so rankings are checked on the layer losses, where the margins are wide)
    assert quant["accuracy"]["obc"][i4] > dense - 0.02
    assert quant["loss"]["obc"][i4] * 2 < quant["loss"]["magnitude"][i4]
    # claim 3: joint 2:4 + 4-bit
    joint = r["joint_2of4_w4"]
    assert joint["loss"]["obc"] < 0.95 * joint["loss"]["magnitude"]  # measured: 1.51 vs 1.70
    assert joint["accuracy"]["obc"] > joint["accuracy"]["magnitude"] - 0.02
    # claim 6: both modes ran and report a finite loss
    seq = r["one_pass_vs_sequential"]
    assert seq["one_pass"]["loss"] >= 0 and seq["sequential"]["loss"] >= 0


def test_dp_budget_smoke(tmp_path):
    assert _experiment("dp_budget").main(["--smoke", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "dp_budget.json").read_text())
    assert (tmp_path / "dp_budget.png").stat().st_size > 0
    (run,) = r["runs"].values()
    assert run["rows"], "no budget was evaluated"
    for row in run["rows"]:
        dp, un = row["dp"], row["uniform"]
        assert "accuracy" in dp, dp
        # the DP reaches its budget and its database loss is never above the uniform choice's
        assert dp["reduction"] >= row["factor"] * (1 - 1e-9)
        if "db_loss" in un:
            assert dp["db_loss"] <= un["db_loss"] * (1 + 1e-6)
    # resumable: a second run reuses the saved database and gives the same choices
    assert (tmp_path / "db").is_dir()
    assert _experiment("dp_budget").main(["--smoke", "--out", str(tmp_path)]) == 0
    r2 = json.loads((tmp_path / "dp_budget.json").read_text())
    (run2,) = r2["runs"].values()
    assert [row["dp"]["levels"] for row in run2["rows"]] == [
        row["dp"]["levels"] for row in run["rows"]
    ]



def test_allocation_compare_quick(tmp_path):
    assert _experiment("allocation_compare").main(["--quick", "--out", str(tmp_path)]) == 0
    (r,) = json.loads((tmp_path / "allocation_compare.json").read_text())
    assert (tmp_path / "allocation_compare.png").stat().st_size > 0
    assert {row["metric"] for row in r["rows"]} == {"size", "bops"}
    for row in r["rows"]:
        m = row["methods"]
        assert set(m) == {"uniform", "dp_obs", "dp_squared", "dp_network", "spdy", "fit",
                          "fit_reest"}
        for res in m.values():
            assert "accuracy" in res, res
            assert res["cost"] <= row["budget"] * (1 + 1e-9)  # every method meets the budget
        # FIT is measured with the database's cost function, which its own cost model matches;
        # re-estimation runs one Fisher pass per expansion after the first
        for method in ("fit", "fit_reest"):
            assert m[method]["cost_model_diff"] == 0
        assert m["fit"]["fisher_passes"] == 0
        assert m["fit_reest"]["fisher_passes"] == m["fit_reest"]["steps"] - 1 >= 1
        # each DP is optimal for its own score, and SPDY never loses to its starting DP
        assert m["dp_obs"]["obs_loss"] <= m["uniform"]["obs_loss"] * (1 + 1e-9)
        assert m["spdy"]["calib_loss"] <= m["spdy"]["dp_start_calib_loss"]
        assert m["spdy"]["calib_loss"] <= m["dp_network"]["calib_loss"] * (1 + 1e-6)
