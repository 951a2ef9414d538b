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


# ------------------------------------------------------------------ natural English (gensim data)


def _need_gensim():
    import importlib.util

    if importlib.util.find_spec("gensim") is None:
        pytest.skip("the natural-English sources read gensim's test data: pip install gensim")


def test_natural_sources_are_prose(no_network):
    _need_gensim()
    assert set(text.NATURAL) <= set(text.SOURCES)
    counts = {name: len(text.source_sentences(name)) for name in text.NATURAL}
    assert counts["news"] > 1000 and counts["wikipedia"] > 5000 and counts["reviews"] > 100, counts
    for name in text.NATURAL:
        for s in text.source_sentences(name):
            assert s[0].isupper() and s[-1] in ".!?" and s.isascii(), (name, s)
            assert not any(m in s for m in ("{{", "}}", "[[", "]]", "|", "<", ">", "''")), (name, s)
            assert "http" not in s and "__label__" not in s and " ," not in s, (name, s)
            assert len(s) >= 30 and len(s.split()) >= 6, (name, s)
            assert s.count('"') % 2 == 0 and s.count("(") == s.count(")"), (name, s)
    # the reviews are de-tokenized ("it 's funny ." -> "It's funny.") and capitalised
    reviews = text.source_sentences("reviews")
    assert (
        "It's so laddish and juvenile, only teenage boys could possibly find it funny." in reviews
    )


def test_wikipedia_markup_is_stripped():
    markup = (
        "{{Infobox person|name=X|note={{nested|a}}}}\n"
        "'''Ada Lovelace''' was an [[England|English]] [[mathematician]] and writer."
        "<ref>{{cite book|title=T}}</ref> She is known for her work on the "
        '[[Analytical Engine]]<ref name="a"/> of [http://example.org Charles Babbage].\n'
        "[[File:Ada.jpg|thumb|A portrait of [[Ada Lovelace]]]]\n"
        "== Early life ==\n"
        '{| class="wikitable"\n| cell || another cell of the table here\n|}\n'
        "* A list item that reads like a sentence of prose.\n"
        "<!-- a hidden comment that reads like a sentence. -->\n"
        "Her father was the poet Lord Byron ({{lang|en|x}}) and her mother was Anne.\n"
        "[[Category:Mathematicians]]"
    )
    got = list(text.split_sentences(text._wiki_text(markup)))
    assert got == [
        "Ada Lovelace was an English mathematician and writer.",
        "She is known for her work on the Analytical Engine of Charles Babbage.",
        "Her father was the poet Lord Byron and her mother was Anne.",
    ]


@pytest.mark.parametrize("held_out", ["news", "wikipedia"])
def test_natural_held_out_disjoint_and_deterministic(held_out):
    _need_gensim()
    calib = [s for s in text.NATURAL if s != held_out] + ["readmes"]
    a = text.english_corpus(calib, [held_out], ncalib=120, ntest=60)
    b = text.english_corpus(calib, [held_out], ncalib=120, ntest=60)
    c = text.english_corpus(calib, [held_out], ncalib=120, ntest=60, seed=3)
    assert a == b and a["calib"] != c["calib"] and a["test"] != c["test"]
    assert len(a["calib"]) == 120 and len(a["test"]) == 60
    assert not set(a["calib"]) & set(a["test"])
    assert set(a["test"]) <= set(text.source_sentences(held_out))
    assert not set(a["calib"]) & set(text.source_sentences(held_out))
    assert [s.split(":")[0] for s in a["calib_sources"]] == calib


def test_missing_gensim_only_fails_when_asked_for(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gensim" else find_spec(name, *a),
    )
    text._unique_sentences.cache_clear()
    try:
        assert text.source_texts("news") == [] and text.source_sentences("wikipedia") == []
        # the default calibration sources leave the absent ones out
        c = text.english_corpus(ncalib=20, ntest=5)
        assert {s.split(":")[0] for s in c["calib_sources"]} >= set(text.NATURAL)
        assert all(s.endswith(":0") for s in c["calib_sources"] if s.split(":")[0] in text.NATURAL)
        with pytest.raises(ModuleNotFoundError, match="'news' reads files that ship with gensim"):
            text.english_corpus(["readmes"], ["news"])
        with pytest.raises(ModuleNotFoundError, match="'reviews'.*pip install"):
            text.english_corpus(["reviews", "readmes"], ["idle"])
    finally:
        text._unique_sentences.cache_clear()
