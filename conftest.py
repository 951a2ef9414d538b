"""Test-wide set-up, and the README and docstring examples as tests.

Four fake CPU devices (for the sharding tests) are set before JAX is imported. Every ``python``
block of ``README.md`` and every ``>>>`` example in a docstring under ``obcjax/`` is collected by
sybil (https://sybil.readthedocs.io) as a test of its own: ``pytest README.md obcjax``. The blocks
of one file share a namespace and run in order; a file's items stay together under
``--dist loadfile``.
"""

import os
from doctest import ELLIPSIS, NORMALIZE_WHITESPACE

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OBCJAX_CACHE", os.path.join(os.path.dirname(__file__), ".cache-test"))
# One persistent XLA compilation cache for the whole run (JAX reads these at import, and the CLI,
# notebook and experiment subprocesses inherit them): both workers and every subprocess compile
# the same solver programs at the same shapes, and each is compiled once. It starts empty on a
# fresh clone; entries are keyed by program, JAX version and device, so nothing stale is reused.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["OBCJAX_CACHE"], "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402
from sybil import Sybil  # noqa: E402
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser  # noqa: E402
from sybil.parsers.rest import DocTestParser  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

_FLAGS = ELLIPSIS | NORMALIZE_WHITESPACE

pytest_collect_file = (
    # README.md at the top only ("*/*" keeps out any README.md in a sub-folder).
    Sybil(
        parsers=[PythonCodeBlockParser(doctest_optionflags=_FLAGS), SkipParser()],
        patterns=["README.md"],
        excludes=["*/*"],
        name="readme",
    )
    + Sybil(
        parsers=[DocTestParser(optionflags=_FLAGS)],
        patterns=["*.py"],
        path="obcjax",
        name="docstrings",
    )
).pytest()

# Docstring examples that do not run yet, in modules whose owners are fixing them: still collected
# and run (reported as xfail / xpass), so the suite stays green meanwhile. Remove an entry once its
# module's examples pass. ``run=False`` only where running has side effects or costs a minute.
_BEING_FIXED = {
}
_NOT_RUN: set[str] = set()


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        path = item.nodeid.split("::")[0]
        if "::sybil:docstrings" in item.nodeid and path in _BEING_FIXED:
            item.add_marker(
                pytest.mark.xfail(
                    reason=f"docstring example being fixed: {_BEING_FIXED[path]}",
                    strict=False,
                    run=path not in _NOT_RUN,
                )
            )
