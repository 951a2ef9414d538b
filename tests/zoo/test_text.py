"""obcjax.zoo.text: offline English sentences from several sources, held-out sets from others."""

from __future__ import annotations

import socket

import pytest

from obcjax.zoo import data, text


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_split_sentences_keeps_prose_drops_code_and_lists():
    doc = (
        "The editor window opens a file for editing. It has a menu bar!\n\n"
        "    indented = code(block)\n\n"
        "- a list item that reads like a sentence of prose.\n\n"
        "Set x = 1 to enable it in the options dialog.\n"
        "short one."
    )
    assert list(text.split_sentences(doc)) == ["The editor window opens a file for editing."]
    assert list(text.split_sentences("")) == []


def test_sources_offline_and_prose_like(no_network):
    counts = {name: len(text.source_sentences(name)) for name in text.SOURCES}
    # the in-domain sources and IDLE's documentation ship with CPython itself
    for name in ("reference", "docstrings", "idle"):
        assert counts[name] > 100, counts
    for s in text.source_sentences("idle"):
        assert s[0].isupper() and s[-1] in ".!?" and s.isascii()
        assert not (set("=_{}[]#*`<>/") & set(s))


def test_in_domain_corpus_is_built_from_the_in_domain_sources():
    corpus = data.text_corpus(per_split=50)
    pool = {s for name in text.IN_DOMAIN for s in text.source_sentences(name)}
    assert set(corpus["calib"]) <= pool and set(corpus["test"]) <= pool


def test_english_corpus_disjoint_sources_and_sentences():
    c = text.english_corpus(ncalib=300, ntest=100)
    assert len(c["calib"]) == 300 and len(c["test"]) == 100
    assert not set(c["calib"]) & set(c["test"])
    idle = set(text.source_sentences("idle"))
    assert set(c["test"]) <= idle
    # no calibration sentence comes from the held-out source, even one another source also has
    assert not set(c["calib"]) & idle
    names = [s.split(":")[0] for s in c["calib_sources"]]
    assert "idle" not in names and set(names) == set(text.SOURCES) - {"idle"}
    # round-robin: the first sentences come from several sources, not the largest one only
    first = c["calib"][:20]
    origin = {n for n in names for s in first if s in text.source_sentences(n)}
    assert len(origin) >= 4, origin


def test_english_corpus_deterministic_seeded_and_exclude():
    a = text.english_corpus(["readmes", "reference"], ["idle"], ncalib=40, ntest=20)
    b = text.english_corpus(["readmes", "reference"], ["idle"], ncalib=40, ntest=20)
    c = text.english_corpus(["readmes", "reference"], ["idle"], ncalib=40, ntest=20, seed=1)
    assert a == b and a["calib"] != c["calib"] and a["test"] != c["test"]
    d = text.english_corpus(
        ["readmes", "reference"], ["idle"], ncalib=40, ntest=20, exclude=a["calib"][:10]
    )
    assert not set(d["calib"]) & set(a["calib"][:10]) and d["test"] == a["test"]


def test_english_corpus_refuses_bad_sources_and_counts():
    with pytest.raises(ValueError, match="in both"):
        text.english_corpus(["idle", "readmes"], ["idle"])
    with pytest.raises(ValueError, match="unknown text source 'wiki'"):
        text.english_corpus(["wiki"], ["idle"])
    with pytest.raises(ValueError, match="list of names"):
        text.english_corpus("readmes", ["idle"])
    with pytest.raises(ValueError, match="must not be empty"):
        text.english_corpus([], ["idle"])
    with pytest.raises(ValueError, match="ncalib must be >= 1"):
        text.english_corpus(ncalib=0)
    with pytest.raises(TypeError, match="ntest must be an int"):
        text.english_corpus(ntest=2.5)
    with pytest.raises(ValueError, match="unknown text source"):
        text.source_sentences("nope")
