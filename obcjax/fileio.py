"""Safe files: one atomic-write helper and the error raised for damaged files.

Every file obcjax writes (packed exports, the database's per-layer ``.npz`` members) goes through
:func:`atomic_write`: the bytes land in a temporary file next to the target, are flushed and
fsynced, and replace the target with one ``os.replace``, so a crash at any point leaves either the
old file or the new one, whole, never a mix. The helper also refuses what would silently go wrong:

* a target that is a directory, or whose parent folder does not exist: one error naming the path
  the caller gave (never the hidden temporary name);
* a read-only target (no write bit in its mode, whoever runs the process, root included): refused
  unless ``overwrite_readonly=True``; a replaced file keeps its permission bits;
* a failed write (full disk, I/O error, interruption): the temporary file is removed and the
  error names the target; the old file is untouched;
* temporary files left by a writer that was killed (``SIGKILL``, power loss) are removed by the
  next write to the same target. Temporary names carry the writer's process id
  (``.<name>.<pid>.<random>.tmp``), so a writer that is still running is never disturbed.

Readers raise :class:`CorruptedFileError` (a ``ValueError``) when a file fails its checks: it
names the file and the field that does not verify.

Example:
    >>> import os, tempfile
    >>> import numpy as np
    >>> from obcjax.fileio import atomic_write
    >>> d = tempfile.mkdtemp()
    >>> atomic_write(os.path.join(d, "out.bin"), b"payload")                 # bytes
    >>> atomic_write(os.path.join(d, "out.npz"), lambda f: np.savez(f, a=np.arange(3)))  # a writer
    >>> sorted(os.listdir(d))
    ['out.bin', 'out.npz']
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from typing import BinaryIO

__all__ = [
    "CorruptedFileError",
    "atomic_write",
    "check_readable",
    "check_writable",
    "stale_temp_files",
]

# A temporary file whose writer cannot be checked (another host sharing the folder, a pid that was
# reused) is removed once it is this old: no single write of ours lasts a day.
_STALE_AGE_S = 24 * 3600
_WRITE_BITS = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH


class CorruptedFileError(ValueError):
    """A file obcjax wrote does not verify: truncated, a flipped byte, an edited header.

    The message names the file and the field (manifest, tensor, member, layer) that failed.
    Raised before anything is returned: no half-loaded or silently altered result.
    """


def _temp_pattern(base: str) -> re.Pattern:
    return re.compile(re.escape(f".{base}.") + r"(\d+)\.[0-9a-f]+\.tmp")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # os.kill(pid, 0) only probes on POSIX
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else (or cannot be told): keep its file
    return True


def stale_temp_files(path) -> list[str]:
    """Temporary files of ``path`` left by writers that no longer run.

    Args:
      path: the target file whose folder is searched.

    Returns:
      Full paths of ``.<name>.<pid>.<hex>.tmp`` files next to ``path`` whose writing process has
      exited (or that are older than a day), sorted.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    pattern = _temp_pattern(os.path.basename(path))
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    out = []
    now = time.time()
    for name in names:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        full = os.path.join(directory, name)
        try:
            old = now - os.lstat(full).st_mtime > _STALE_AGE_S
        except OSError:
            continue
        if old or not _pid_alive(int(m.group(1))):
            out.append(full)
    return sorted(out)


def _error(e: OSError, path: str, what: str) -> OSError:
    """``e`` again, as the same OSError subclass, with a message naming the user's ``path``."""
    reason = e.strerror or str(e) or type(e).__name__
    msg = f"cannot write {what} {path!r}: {reason}; the old file, if any, is unchanged"
    if e.errno is None:
        return OSError(msg)
    return OSError(e.errno, msg)  # OSError(errno, ...) builds the matching subclass


def _fspath(path, what: str) -> str:
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(
            f"{what}: the path must be a str or os.PathLike, got {type(path).__name__}"
        ) from None
    if not isinstance(path, str) or not path:
        raise TypeError(f"{what}: the path must be a non-empty str, got {path!r}")
    return path


def check_writable(path, *, overwrite_readonly: bool = False, what: str = "file") -> int | None:
    """Check, before any work, that :func:`atomic_write` may write ``path``.

    Args:
      path: the target file.
      overwrite_readonly: allow replacing a target without write permission bits.
      what: what the file is, for error messages.

    Returns:
      The permission bits of the existing target (kept by the replacement), or None if there is
      none yet.

    Raises:
      The errors of :func:`atomic_write` for a directory, a missing or non-folder parent, a
      read-only target, or a target that is not a regular file; each names ``path``.
    """
    path = _fspath(path, what)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(
            errno.EISDIR, f"cannot write {what} {path!r}: it is a directory; give a file path"
        )
    if not os.path.exists(directory):
        raise FileNotFoundError(
            errno.ENOENT,
            f"cannot write {what} {path!r}: its folder {directory!r} does not exist; create it "
            f"first",
        )
    if not os.path.isdir(directory):
        raise NotADirectoryError(
            errno.ENOTDIR, f"cannot write {what} {path!r}: {directory!r} is not a folder"
        )
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _error(e, path, what) from e
    if not stat.S_ISREG(st.st_mode):
        raise OSError(
            errno.EINVAL, f"cannot write {what} {path!r}: it exists and is not a regular file"
        )
    mode = stat.S_IMODE(st.st_mode)
    if not mode & _WRITE_BITS and not overwrite_readonly:
        raise PermissionError(
            errno.EACCES,
            f"refusing to replace the read-only {what} {path!r} (mode {mode:o}); pass "
            f"overwrite_readonly=True to replace it, or make it writable first",
        )
    return mode


def check_readable(path, *, what: str = "file") -> str:
    """``path`` as a str once it is known to be an existing regular file.

    Args:
      path: the file to read.
      what: what the file is, for error messages.

    Returns:
      ``os.fspath(path)``.

    Raises:
      IsADirectoryError: ``path`` is a directory. FileNotFoundError: there is no such file.
    """
    path = _fspath(path, what)
    if os.path.isdir(path):
        raise IsADirectoryError(
            errno.EISDIR, f"cannot load {what} {path!r}: it is a directory, not a file"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, f"no such file: {path!r}")
    return path


def atomic_write(
    path,
    data: bytes | bytearray | memoryview | Callable[[BinaryIO], None],
    *,
    overwrite_readonly: bool = False,
    what: str = "file",
) -> None:
    """Write a file so that a crash leaves the old file or the new one, whole.

    Args:
      path: the target file (str or ``os.PathLike``).
      data: the bytes, or a function ``write(f)`` that writes them to the open binary file ``f``
        (for large contents that should not sit in memory twice).
      overwrite_readonly: replace a target without write permission bits (it keeps its mode).
        By default such a target is refused.
      what: what the file is, for error messages (``"file"``, ``"database member"``).

    Raises:
      IsADirectoryError: ``path`` is a directory.
      FileNotFoundError / NotADirectoryError: its parent folder does not exist / is not a folder.
      PermissionError: the target is read-only (and ``overwrite_readonly`` is False), or the
        folder is not writable.
      OSError: any other failure while writing (e.g. ``ENOSPC``, a full disk). Every message
        names ``path``; the temporary file is gone and the old file untouched.
      Exceptions raised by ``data(f)`` itself pass through unchanged (after the clean-up).
    """
    path = _fspath(path, what)
    mode = check_writable(path, overwrite_readonly=overwrite_readonly, what=what)
    directory = os.path.dirname(os.path.abspath(path))
    for old in stale_temp_files(path):
        with contextlib.suppress(OSError):
            os.unlink(old)
    tmp = os.path.join(
        directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    )
    try:
        # O_EXCL: never clobber a stranger's file; 0o666 lets the umask set a new file's mode.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise _error(e, path, what) from e
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
            if mode is not None and hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _error(e, path, what) from e
        raise
    # The rename is durable only once the directory entry is on disk.
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
