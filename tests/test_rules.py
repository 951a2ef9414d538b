"""obcjax.rules: ordered regex rules, first match wins, unmatched rules are errors."""

import re

import pytest

from obcjax.rules import match_rules

PATHS = ["conv1", "block1/conv1", "block1/conv2", "encoder/layer_0/attention/query", "head"]


def test_first_match_wins_and_order_follows_paths():
    out = match_rules(PATHS, [("block1/.*", "a"), (".*conv.*", "b"), ("head", None)])
    assert list(out) == ["conv1", "block1/conv1", "block1/conv2", "head"]
    assert out == {"conv1": "b", "block1/conv1": "a", "block1/conv2": "a", "head": None}


def test_fullmatch_not_search():
    # "conv1" must not match "block1/conv1": the whole path has to match.
    assert match_rules(PATHS, [("conv1", 1)]) == {"conv1": 1}
    assert match_rules(PATHS, [(".*conv1", 1)]) == {"conv1": 1, "block1/conv1": 1}


def test_bare_strings_single_string_mapping_and_compiled():
    assert match_rules(PATHS, [".*query"]) == {"encoder/layer_0/attention/query": True}
    assert match_rules(PATHS, "head") == {"head": True}
    assert match_rules(PATHS, {"head": None, ".*": 3}) == {
        "conv1": 3,
        "block1/conv1": 3,
        "block1/conv2": 3,
        "encoder/layer_0/attention/query": 3,
        "head": None,
    }
    assert match_rules(PATHS, [(re.compile("block1/conv[12]"), 7)]) == {
        "block1/conv1": 7,
        "block1/conv2": 7,
    }


def test_unmatched_paths_left_out_and_shadowed_rules_allowed():
    out = match_rules(PATHS, [("head", 1), (".*", None), ("conv1", 2)])
    assert out["head"] == 1 and out["conv1"] is None


def test_rule_matching_nothing_names_rule_and_paths():
    with pytest.raises(ValueError) as e:
        match_rules(PATHS, [(".*conv.*", 1), ("blok1/conv2", 2)], what="layer")
    msg = str(e.value)
    assert "'blok1/conv2'" in msg and "'block1/conv2'" in msg and "'head'" in msg
    with pytest.raises(ValueError, match="matches no parameter"):
        match_rules([], [".*"], what="parameter")


def test_bad_rules():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        match_rules(PATHS, [("conv(", 1)])
    with pytest.raises(TypeError, match="regex string or a"):
        match_rules(PATHS, [("conv1", 1, 2)])
    with pytest.raises(TypeError, match="must be a string"):
        match_rules(PATHS, [(3, 1)])


def test_values_pass_through_untouched():
    # rule values are opaque to the matcher: a LayerSpec with a solver option record reaches
    # compress (and from there obcjax.kernels.solve) as it was written
    from obcjax.specs import GPTQ, Int
    from obcjax.transforms import LayerSpec

    spec = LayerSpec(quant=Int(4), solver=GPTQ(act_order=True, static_groups=False))
    out = match_rules(PATHS, [("head", None), (".*", spec)])
    assert out.pop("head") is None
    assert all(v is spec for v in out.values()) and len(out) == len(PATHS) - 1
