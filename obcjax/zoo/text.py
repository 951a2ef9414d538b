"""Offline English sentences from several sources, for calibrating and evaluating text encoders.

A sentence encoder such as all-MiniLM-L6-v2 compressed with GPTQ or SparseGPT is only as good on
a kind of text as its calibration text is like it. The text here is whatever ships with Python
and the installed packages -- nothing is downloaded -- cut into prose-like sentences by
:func:`split_sentences`, and grouped by where it comes from (:data:`SOURCES`):

* ``"zen"``, ``"reference"``, ``"docstrings"`` -- the Zen of Python, the language-reference topics
  of ``pydoc_data`` and standard-library docstrings: the corpus of
  :func:`obcjax.zoo.data.text_corpus` (technical, about Python itself);
* ``"idle"`` -- IDLE's user documentation (``idlelib/help.html``, its README, history, news and
  credits): plain instructions and narrative about an editor, written for people;
* ``"licenses"`` -- Python's ``LICENSE.txt`` (with the history of the language) and the licence
  files of the installed distributions;
* ``"readmes"`` -- the long descriptions (READMEs) in the installed distributions' metadata;
* ``"email"`` -- the ``email`` package's architecture notes and the test suite's sample messages
  (when the ``test`` package is installed);
* ``"datasets"`` -- scikit-learn's descriptions of its bundled data sets (when installed);
* ``"news"``, ``"wikipedia"``, ``"reviews"`` (:data:`NATURAL`) -- natural English that ships as
  test data inside the ``gensim`` package (when installed; it is never imported): the Lee corpus
  of Australian news stories, 100-odd Wikipedia articles (MediaWiki markup stripped) and Pang &
  Lee's movie-review sentences (de-tokenized).

:func:`english_corpus` draws a calibration set from some sources and a held-out set from others,
and refuses overlapping source lists, so a calibration can be judged on text of a kind it has
never seen. The sources that read installed distributions (``"licenses"``, ``"readmes"``) depend
on the environment; ``"idle"``, ``"zen"``, ``"reference"`` and ``"docstrings"`` depend only on
the Python version; the :data:`NATURAL` ones only on the gensim release.

Example:
    >>> corpus = english_corpus(ncalib=64, ntest=32)
    >>> len(corpus["calib"]), len(corpus["test"])
    (64, 32)
    >>> [name.split(":")[0] for name in corpus["test_sources"]]
    ['idle']
    >>> set(corpus["calib"]) & set(corpus["test"])
    set()
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import html
import html.parser
import importlib
import importlib.metadata
import importlib.util
import inspect
import io
import pathlib
import re
import sysconfig
import warnings
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

__all__ = [
    "SOURCES",
    "IN_DOMAIN",
    "HELD_OUT",
    "NATURAL",
    "split_sentences",
    "source_texts",
    "source_sentences",
    "english_corpus",
]

#: Text sources by name, with what each one reads.
SOURCES = {
    "zen": "the Zen of Python (module this)",
    "reference": "the language-reference topics of pydoc_data.topics",
    "docstrings": "docstrings of ~80 standard-library modules and their public members",
    "idle": "IDLE's user documentation: idlelib/help.html, README, HISTORY, NEWS, CREDITS",
    "licenses": "Python's LICENSE.txt and the licence files of installed distributions",
    "readmes": "long descriptions (READMEs) in installed distributions' metadata",
    "email": "the email package's architecture notes and the test suite's sample messages",
    "datasets": "scikit-learn's descriptions of its bundled data sets",
    "news": "the Lee corpus of Australian news stories (gensim's test data)",
    "wikipedia": "about 100 English Wikipedia articles, markup stripped (gensim's test data)",
    "reviews": "Pang & Lee's movie-review sentences, de-tokenized (gensim's test data)",
}
#: The sources of :func:`obcjax.zoo.data.text_corpus` (text about Python itself).
IN_DOMAIN = ("zen", "reference", "docstrings")
#: The default held-out source of :func:`english_corpus`.
HELD_OUT = ("idle",)
#: Natural English (news, encyclopedia, reviews) rather than text about software.
NATURAL = ("news", "wikipedia", "reviews")
# source -> (import name, distribution) of the package whose files it reads, for the error when
# a caller names the source and the package is absent.
_NEEDS = {
    "news": ("gensim", "gensim"),
    "wikipedia": ("gensim", "gensim"),
    "reviews": ("gensim", "gensim"),
    "datasets": ("sklearn", "scikit-learn"),
}

# Standard-library modules whose docstrings (module + public members) feed "docstrings", in a
# fixed order. A module missing from a stripped-down Python is skipped.
_DOC_MODULES = (
    "abc", "argparse", "array", "asyncio", "base64", "bisect", "calendar", "collections",
    "concurrent.futures", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "enum", "fnmatch", "fractions", "functools", "getopt", "gettext", "glob",
    "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "locale", "logging", "mailbox", "math", "mimetypes",
    "operator", "optparse", "os", "pathlib", "pickle", "platform", "pprint", "queue", "random",
    "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "tokenize", "trace", "traceback", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom",
    "zipfile", "zlib",
)  # fmt: skip
_IDLE_FILES = ("README.txt", "HISTORY.txt", "NEWS.txt", "NEWS2x.txt", "CREDITS.txt", "extend.txt")
_LICENSE_NAME = re.compile(r"(LICEN[CS]E|COPYING|NOTICE|AUTHORS)", re.IGNORECASE)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_CHARS = set("=_{}[]\\|#*`<>~^$@%/;")
_MIN_CHARS, _MAX_CHARS, _MIN_WORDS = 30, 200, 6


# ---------------------------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------------------------


def split_sentences(text: str) -> Iterator[str]:
    """The prose-like sentences of ``text``, in order.

    Paragraphs (split at blank lines) with an indented, list or prompt line are skipped; the
    rest are joined and cut after ``.``, ``!`` or ``?`` followed by a capital. A sentence is kept
    if it has 30..200 ASCII characters and at least 6 words, starts with a capital, ends with
    ``.``, ``!`` or ``?``, and looks like prose: no code punctuation (``= _ { } [ ] # * / ...``),
    no ``()`` or ``..``, at least 90 % letters and spaces.

    Args:
      text: any text.

    Yields:
      Sentences (``str``), duplicates included.

    Example:
        >>> list(split_sentences("IDLE has two main window types. See x = 1.\\n\\n    code"))
        ['IDLE has two main window types.']
        >>> list(split_sentences("The shell opens when IDLE starts. Then you can open an editor window!"))
        ['The shell opens when IDLE starts.', 'Then you can open an editor window!']
    """
    for para in re.split(r"\n\s*\n", text):
        lines = para.strip().splitlines()
        if not lines or any(line.startswith((" ", "\t", ">>>", "-", "*", "+")) for line in lines):
            continue
        for s in _SENTENCE_END.split(" ".join(line.strip() for line in lines)):
            s = s.strip()
            if not (_MIN_CHARS <= len(s) <= _MAX_CHARS) or not s[0].isupper():
                continue
            if s[-1] not in ".!?" or _CODE_CHARS & set(s) or "()" in s or ".." in s:
                continue
            words = s.split()
            if len(words) < _MIN_WORDS or not s.isascii():
                continue
            # Mostly letters: drops tables of numbers, signatures and option lists.
            if sum(ch.isalpha() or ch == " " for ch in s) < 0.9 * len(s):
                continue
            yield s


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def _stdlib() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _read(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page, one paragraph per block element; code blocks dropped."""

    _BLOCKS = frozenset(("p", "li", "div", "dd", "dt", "h1", "h2", "h3", "h4", "section", "tr"))
    _SKIP = frozenset(("pre", "script", "style", "head"))

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in self._SKIP
        if tag in self._BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        self.skip -= tag in self._SKIP and self.skip > 0
        if tag in self._BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data.replace("\n", " "))


def _html_text(source: str) -> str:
    parser = _HTMLText()
    parser.feed(source)
    parser.close()
    return "".join(parser.parts)


def _zen() -> list[str]:
    # Importing `this` prints the Zen; its text is stored rot13-encoded in `this.s`.
    with contextlib.redirect_stdout(io.StringIO()):
        this = importlib.import_module("this")
    return [codecs.decode(this.s, "rot13")]


def _reference() -> list[str]:
    topics = importlib.import_module("pydoc_data.topics").topics
    return [topics[key] for key in sorted(topics)]


def _docstrings() -> list[str]:
    texts = []
    # Reading docstrings touches deprecated aliases (e.g. typing.re); their warnings are noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in _DOC_MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            texts.append(inspect.getdoc(mod) or "")
            for attr in sorted(vars(mod)):
                obj = vars(mod)[attr]
                if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                texts.append(inspect.getdoc(obj) or "")
    return texts


def _idle() -> list[str]:
    root = _stdlib() / "idlelib"
    page = _read(root / "help.html")
    return [_html_text(page) if page else ""] + [_read(root / name) for name in _IDLE_FILES]


def _distributions() -> list[importlib.metadata.Distribution]:
    """Installed distributions, one per normalised name, sorted by it."""
    seen = {}
    for dist in importlib.metadata.distributions():
        name = re.sub(r"[-_.]+", "-", (dist.metadata["Name"] or "").lower())
        if name and name not in seen:
            seen[name] = dist
    return [seen[name] for name in sorted(seen)]


def _licenses() -> list[str]:
    texts = [_read(_stdlib() / "LICENSE.txt")]
    for dist in _distributions():
        for file in sorted(dist.files or [], key=str):
            if _LICENSE_NAME.search(file.name):
                with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):
                    texts.append(file.read_text(encoding="utf-8"))
    return texts


def _readmes() -> list[str]:
    texts = []
    for dist in _distributions():
        body = dist.metadata.get_payload() or dist.metadata["Description"] or ""
        texts.append(body if isinstance(body, str) else "")
    return texts


def _email() -> list[str]:
    root = _stdlib()
    texts = [_read(root / "email" / "architecture.rst")]
    data = root / "test" / "test_email" / "data"
    if data.is_dir():
        texts.extend(_read(p) for p in sorted(data.glob("msg_*.txt")))
    return texts


def _datasets() -> list[str]:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return []
    descr = pathlib.Path(next(iter(spec.submodule_search_locations))) / "datasets" / "descr"
    return [_read(p) for p in sorted(descr.glob("*.rst"))]


def _gensim_data() -> pathlib.Path | None:
    """gensim's bundled test-data folder, found without importing gensim (which pulls SciPy)."""
    try:
        spec = importlib.util.find_spec("gensim")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    data = pathlib.Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"
    return data if data.is_dir() else None


def _news() -> list[str]:
    data = _gensim_data()
    if data is None:
        return []
    # One story per line; each line is its own document (paragraph).
    return [line for name in ("lee_background.cor", "lee.cor")
            for line in _read(data / name).splitlines()]  # fmt: skip


_WIKI_ELEMENTS = re.compile(
    r"<(ref|math|gallery|code|pre|source|syntaxhighlight|timeline|score|chem|nowiki|poem|"
    r"imagemap|references)\b[^>]*?(/>|>.*?</\1\s*>)",
    re.DOTALL | re.IGNORECASE,
)
_WIKI_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_WIKI_TABLE = re.compile(r"\{\|(?:(?!\{\|)[\s\S])*?\|\}")
_WIKI_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_WIKI_NAMESPACE = re.compile(r"^\s*:?\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)
_WIKI_EXTERNAL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_URL = re.compile(r"(?:https?:|ftp:)?//\S+|www\.\S+")
_ASCII_PUNCT = str.maketrans({"\u2013": "-", "\u2014": " - ", "\u2018": "'", "\u2019": "'",
                              "\u201c": '"', "\u201d": '"', "\xa0": " "})  # fmt: skip


def _wiki_link(match: re.Match) -> str:
    inner = match.group(1)
    if _WIKI_NAMESPACE.match(inner):
        return ""  # files, categories and links to other languages' articles
    return inner.rsplit("|", 1)[-1]


def _repeat(pattern: re.Pattern, repl, text: str) -> str:
    """Substitute until nothing matches (innermost first, for nested templates and links)."""
    while True:
        text, n = pattern.subn(repl, text)
        if not n:
            return text


def _wiki_text(markup: str) -> str:
    """The prose of a MediaWiki article: markup stripped, one paragraph per block.

    Templates (nested), ``<ref>`` and other non-prose elements, tables, files, categories,
    comments, HTML tags and URLs are dropped; ``[[target|label]]`` becomes ``label``,
    ``[url label]`` becomes ``label``; bold and italic quotes go. Headings, list, table and
    indented lines become paragraph breaks, so :func:`split_sentences` never joins them with
    prose.
    """
    t = html.unescape(re.sub(r"<!--.*?-->", "", markup, flags=re.DOTALL))
    t = _WIKI_ELEMENTS.sub("", t)
    t = re.sub(r"<ref\b[^>]*/?>", "", t, flags=re.IGNORECASE)
    t = _repeat(_WIKI_TEMPLATE, "", t)
    t = _repeat(_WIKI_TABLE, "", t)
    t = _repeat(_WIKI_LINK, _wiki_link, t)
    t = _WIKI_EXTERNAL.sub(lambda m: m.group(1), t)
    t = _URL.sub("", t)
    t = re.sub(r"</?[a-zA-Z][^<>]*>", "", t)  # remaining tags (<sub>, <small>, <br />, ...)
    t = re.sub(r"'{2,}", "", t).translate(_ASCII_PUNCT)
    lines = []
    for line in t.splitlines():
        s = line.strip()
        if not s or s[0] in "=*#:;|!{}[<" or line[0] in " \t" or s.startswith("----"):
            lines.append("")  # headings, lists, tables, indented blocks: paragraph breaks
            continue
        s = re.sub(r"\(\s*[,;:]*\s*\)", "", s)  # parentheses emptied by removed templates
        lines.append(re.sub(r"\s{2,}", " ", s))
    # no space before punctuation, also where a removed element left a line break before it
    return re.sub(r"\s+([,.;:!?])", r"\1", "\n".join(lines))


def _wikipedia() -> list[str]:
    import bz2
    import xml.etree.ElementTree as ET

    data = _gensim_data()
    if data is None:
        return []
    path = data / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    texts = []
    with contextlib.suppress(OSError, EOFError, ET.ParseError), bz2.open(path) as f:
        for _, el in ET.iterparse(f):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns, body = el.find("{*}ns"), el.find("{*}revision/{*}text")
            markup = body.text if body is not None and body.text else ""
            if (
                ns is not None
                and ns.text == "0"
                and not markup.lstrip().upper().startswith("#REDIRECT")
            ):
                texts.append(_wiki_text(markup))
            el.clear()
    return texts


def _detokenize(line: str) -> str:
    """``"it's so laddish , only teenage boys could find it funny ."`` -> ``"It's so laddish, ..."``."""
    s = re.sub(r"\s+([,.;:!?)%]|n't|'[a-z]{1,2}\b)", r"\1", line.strip())
    s = re.sub(r"([($])\s+", r"\1", s)
    s = re.sub(r'"\s*([^"]*?)\s*"', r'"\1"', s)  # " the other " -> "the other"
    s = re.sub(r"\bi\b", "I", s)
    # capitals at the start and after a sentence's end
    return re.sub(r"(^|[.!?]\"?\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), s)


def _reviews() -> list[str]:
    data = _gensim_data()
    if data is None:
        return []
    lines = _read(data / "pang_lee_polarity.cor").splitlines()
    # "__label__pos the film is ..." -> "The film is ..."; one sentence per paragraph.
    return ["\n\n".join(_detokenize(re.sub(r"^__label__\w+\s*", "", ln)) for ln in lines)]


_READERS = {
    "zen": _zen,
    "reference": _reference,
    "docstrings": _docstrings,
    "idle": _idle,
    "licenses": _licenses,
    "readmes": _readmes,
    "email": _email,
    "datasets": _datasets,
    "news": _news,
    "wikipedia": _wikipedia,
    "reviews": _reviews,
}


def _check_source(name, where: str) -> str:
    if not isinstance(name, str) or name not in SOURCES:
        raise ValueError(f"{where}: unknown text source {name!r}; choose among {list(SOURCES)}")
    return name


def _require_installed(names: Iterable[str]) -> None:
    """Raise if a named source reads files of a package that is not installed."""
    for name in names:
        module, dist = _NEEDS.get(name, (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(
                f"english_corpus: text source {name!r} reads files that ship with {dist}, which "
                f"is not installed: pip install obcjax[zoo] (or {dist})"
            )


def source_texts(name: str) -> list[str]:
    """The raw texts of one source (see :data:`SOURCES`), in a fixed order.

    A source that this installation lacks (no ``idlelib``, no ``test`` package, no
    scikit-learn) gives fewer texts or none; nothing is downloaded.

    Args:
      name: a key of :data:`SOURCES`.

    Returns:
      A list of strings (whole documents, not yet cut into sentences).

    Raises:
      ValueError: ``name`` is not a source.

    Example:
        >>> "Beautiful is better than ugly." in source_texts("zen")[0]
        True
    """
    name = _check_source(name, "source_texts")
    try:
        return [t for t in _READERS[name]() if t]
    except ImportError:
        return []


def _balanced(s: str) -> bool:
    """Quotes and parentheses paired: no sentence cut inside a quotation or an aside."""
    return s.count('"') % 2 == 0 and s.count("(") == s.count(")")


@functools.cache
def _unique_sentences(name: str) -> tuple[str, ...]:
    sents = (s for text in source_texts(name) for s in split_sentences(text))
    if name in NATURAL:  # quotations are frequent in these; keep whole ones only
        sents = (s for s in sents if _balanced(s))
    return tuple(dict.fromkeys(sents))


def source_sentences(name: str) -> list[str]:
    """The distinct sentences of one source, in reading order (first occurrence kept).

    Args:
      name: a key of :data:`SOURCES`.

    Returns:
      A new list of sentences (see :func:`split_sentences`).

    Raises:
      ValueError: ``name`` is not a source.

    Example:
        >>> len(source_sentences("idle")) > 100
        True
    """
    return list(_unique_sentences(_check_source(name, "source_sentences")))


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"english_corpus: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"english_corpus: {name} must be >= 1, got {value}")
    return int(value)


def _mix(sources: Sequence[str], rng: np.random.Generator, drop: set[str]) -> list[str]:
    """Every sentence of ``sources`` once, each source shuffled, dealt round-robin (balanced)."""
    pools = []
    for name in sources:
        sents = [s for s in _unique_sentences(name) if s not in drop]
        pools.append([sents[i] for i in rng.permutation(len(sents))])
    out: dict[str, None] = {}
    for k in range(max((len(p) for p in pools), default=0)):
        for pool in pools:
            if k < len(pool):
                out.setdefault(pool[k])
    return list(out)


def english_corpus(
    calib_sources: Sequence[str] | None = None,
    test_sources: Sequence[str] = HELD_OUT,
    *,
    ncalib: int = 512,
    ntest: int = 256,
    seed: int = 0,
    exclude: Iterable[str] = (),
) -> dict[str, list[str]]:
    """A calibration set and a held-out set of English sentences from disjoint sources.

    Each source's distinct sentences are shuffled by ``seed`` and the sources are dealt
    round-robin, so every source contributes equally until it runs out (a large source cannot
    crowd out a small one). The held-out set is drawn the same way from ``test_sources``;
    calibration never contains a held-out sentence (nor one of ``exclude``), even where two
    sources share a sentence. Deterministic for a given installation.

    Args:
      calib_sources: calibration sources (keys of :data:`SOURCES`); default every source not in
        ``test_sources``.
      test_sources: held-out sources, disjoint from ``calib_sources`` (default ``("idle",)``).
      ncalib: calibration sentences (fewer if the sources hold fewer).
      ntest: held-out sentences (fewer if the sources hold fewer).
      seed: seed of the shuffles.
      exclude: sentences never to put in the calibration set (e.g. another held-out set).

    Returns:
      ``{"calib": [...], "test": [...], "calib_sources": [...], "test_sources": [...]}``; the
      source lists say how many sentences each source gave, as ``"name:count"`` strings.

    Raises:
      ValueError: an unknown source, a source in both lists, or an empty list.
      ModuleNotFoundError: a source named in ``calib_sources`` or ``test_sources`` reads files of
        a package that is not installed (gensim for :data:`NATURAL`, scikit-learn for
        ``"datasets"``); with the default ``calib_sources`` such a source is left out.
      RuntimeError: the sources hold no sentences in this installation.
      TypeError: a count that is not an int.

    Example:
        >>> c = english_corpus(["readmes", "licenses"], ["idle"], ncalib=8, ntest=4)
        >>> [s.split(":")[0] for s in c["calib_sources"]]
        ['readmes', 'licenses']
    """
    ncalib, ntest = _check_count("ncalib", ncalib), _check_count("ntest", ntest)
    if isinstance(test_sources, str) or (
        calib_sources is not None and isinstance(calib_sources, str)
    ):
        raise ValueError("english_corpus: give sources as a list of names, not one string")
    test_sources = [_check_source(s, "english_corpus: test_sources") for s in test_sources]
    _require_installed(test_sources)
    if calib_sources is None:
        calib_sources = [s for s in SOURCES if s not in test_sources]
    else:
        calib_sources = [_check_source(s, "english_corpus: calib_sources") for s in calib_sources]
        _require_installed(calib_sources)
    both = sorted(set(calib_sources) & set(test_sources))
    if both:
        raise ValueError(
            f"english_corpus: sources {both} are in both calib_sources and test_sources; "
            "the held-out text must come from other sources than the calibration text"
        )
    if not calib_sources or not test_sources:
        raise ValueError("english_corpus: calib_sources and test_sources must not be empty")
    rng = np.random.default_rng(seed)
    test = _mix(test_sources, rng, set())[:ntest]
    calib = _mix(calib_sources, rng, set(test) | set(exclude))[:ncalib]
    if not calib or not test:
        raise RuntimeError(
            f"english_corpus: no sentences found (calibration {len(calib)}, held-out "
            f"{len(test)}) in sources {calib_sources} / {test_sources} of this installation"
        )

    def counts(names, picked):
        picked = set(picked)
        return [f"{n}:{sum(s in picked for s in _unique_sentences(n))}" for n in names]

    return {
        "calib": calib,
        "test": test,
        "calib_sources": counts(calib_sources, calib),
        "test_sources": counts(test_sources, test),
    }
