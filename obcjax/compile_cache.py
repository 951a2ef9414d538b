"""A persistent XLA compilation cache for obcjax programs (on by default in the CLI).

A first call of a solver at a new (shape, options) spends most of its time compiling (about 2-4
s at 256x576 on 2 CPU cores, more than the arithmetic). JAX can keep compiled programs on disk,
so a new process that solves the same shapes loads them instead of compiling again. The CLI
turns this on for every run; library users call :func:`enable_compile_cache` once, before their
first solver call::

    import obcjax
    obcjax.enable_compile_cache()  # ~/.cache/obcjax/xla, or $OBCJAX_CACHE/xla

The cache is JAX's own (``jax_compilation_cache_dir``); entries are keyed by the program, the
JAX/XLA version and the device, so a stale entry is never used for a different program. As JAX's
documentation warns, a cache directory is trusted code: do not share one with untrusted users.
``OBCJAX_NO_COMPILE_CACHE=1`` turns it off for the CLI.
"""

from __future__ import annotations

import os

__all__ = ["enable_compile_cache", "default_cache_dir"]


def default_cache_dir() -> str:
    """``$OBCJAX_CACHE/xla``, else ``~/.cache/obcjax/xla``."""
    root = os.environ.get("OBCJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "obcjax")
    return os.path.join(root, "xla")


def enable_compile_cache(path: str | os.PathLike | None = None, *,
                         min_compile_time_secs: float = 0.1) -> str:
    """Keep compiled XLA programs on disk and reuse them in later processes.

    Call it before the first compilation you want cached (programs compiled earlier in the
    process are not written). It sets JAX's global configuration, so it also caches the user's
    own jitted programs.

    Args:
      path: the cache folder (made if missing). Default: :func:`default_cache_dir`.
      min_compile_time_secs: programs that compiled faster than this are not written (loading
        a tiny program costs about what compiling it does).

    Returns:
      The cache folder in use.

    Raises:
      ValueError: ``min_compile_time_secs`` is negative or not a number.

    Example:
      >>> import tempfile, jax, obcjax
      >>> before = jax.config.jax_compilation_cache_dir
      >>> d = obcjax.enable_compile_cache(tempfile.mkdtemp())
      >>> jax.config.jax_compilation_cache_dir == d
      True
      >>> from jax.experimental.compilation_cache import compilation_cache
      >>> jax.config.update("jax_compilation_cache_dir", before)  # as it was, for what follows
      >>> compilation_cache.reset_cache()
    """
    import jax

    try:
        t = float(min_compile_time_secs)
    except (TypeError, ValueError):
        t = float("nan")
    if not t >= 0:
        raise ValueError(
            f"min_compile_time_secs must be a number >= 0, got {min_compile_time_secs!r}"
        )
    folder = os.fspath(path) if path is not None else default_cache_dir()
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", t)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return folder
