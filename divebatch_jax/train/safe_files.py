"""The run folder as a trust boundary: files opened without following symlinks or blocking.

A run writes into ``--out`` (and a shared cache folder), which someone else may
have prepared: a symlink planted at ``OUT/.lock`` or ``OUT/metrics.jsonl`` would
make the run overwrite the link's target, a FIFO there would hang it. Every file
the run writes or replaces goes through this module:

* :func:`open_regular` opens with ``O_NOFOLLOW | O_NONBLOCK`` and refuses, in one
  line (:class:`UnsafeFileError`), a symlink or anything but a regular file
  (FIFO, device, socket, folder), so it never writes through a link and never
  blocks on a special file; :func:`read_regular` reads one such file whole.
* :func:`write_atomic` writes a fresh temporary file made by ``mkstemp`` (an
  unpredictable name, ``O_EXCL``) in the target's folder and renames it over the
  target: a symlink standing at the target is replaced, never followed.
* :func:`refuse_symlink` for folders the run deletes or descends into (checkpoint
  folders), :func:`check_private_dir` for a folder whose content the run executes
  (the compilation cache).
* :func:`disk_full_as_os_error` around orbax's write: a full disk there is one
  ``OSError(ENOSPC)``, as anywhere else, for the CLI's one line.

    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> os.symlink("/etc/hostname", os.path.join(folder, ".lock"))
    >>> open_regular(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT)
    Traceback (most recent call last):
    ...
    divebatch_jax.train.safe_files.UnsafeFileError: .../.lock is a symlink: the run writes only regular files it can open without following a link; remove it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import logging
import io
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder", stat.S_IFLNK: "a symlink"}


class UnsafeFileError(PermissionError):
  """A symlink or a special file stands where the run reads or writes a file of its own."""


def _refusal(path, kind: str) -> UnsafeFileError:
  return UnsafeFileError(
      f"{path} is {kind}: the run writes only regular files it can open without following a "
      "link; remove it.")


def _kind(mode: int) -> str:
  return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def open_regular(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
  """``os.open(path, flags)`` without following a symlink or blocking; a file descriptor of a
  regular file (blocking again), else :class:`UnsafeFileError` naming the path."""
  try:
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
  except OSError as err:
    if err.errno in (errno.ELOOP, errno.EMLINK, errno.ENXIO):  # a link; a FIFO without a reader
      kind = "a symlink" if os.path.islink(path) else _kind(os.lstat(path).st_mode)
      raise _refusal(path, kind) from None
    raise
  info = os.fstat(fd)
  if not stat.S_ISREG(info.st_mode):
    os.close(fd)
    raise _refusal(path, _kind(info.st_mode))
  fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
  return fd


def read_regular(path: str | os.PathLike) -> bytes:
  """The bytes of the regular file ``path`` (:func:`open_regular`; FileNotFoundError when absent)."""
  fd = open_regular(path, os.O_RDONLY)
  with os.fdopen(fd, "rb") as f:
    return f.read()


def read_text(path: str | os.PathLike) -> str:
  """:func:`read_regular` as UTF-8 text (UnicodeDecodeError, a ValueError, when it is not)."""
  return read_regular(path).decode("utf-8")


def write_atomic(path: str | os.PathLike, text: str | bytes, *, sync: bool = False) -> None:
  """Writes ``text`` (str as UTF-8, or bytes) to ``path`` through a ``mkstemp`` file in its
  folder, then renames it: a reader never sees half of it, a full disk leaves the previous
  file whole, and a symlink standing at ``path`` is replaced, not followed. A folder there is
  refused."""
  path = Path(path)
  if path.is_dir() and not path.is_symlink():
    raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
  fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with (os.fdopen(fd, "wb") if isinstance(text, bytes) else os.fdopen(fd, "w", encoding="utf-8")) as f:
      f.write(text)
      if sync:
        f.flush()
        os.fsync(f.fileno())
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(temporary)
    raise


def write_png(figure, path: str | os.PathLike) -> None:
  """A matplotlib ``figure`` saved as PNG through :func:`write_atomic` (never through a link)."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png")
  write_atomic(path, buffer.getvalue())


def refuse_symlink(path: str | os.PathLike, what: str) -> None:
  """:class:`UnsafeFileError` when ``path`` is a symlink (``what`` names it in the line)."""
  if os.path.islink(path):
    raise UnsafeFileError(
        f"{what} {path} is a symlink: the run deletes and rewrites its own folders only, never "
        "through a link; remove it.")


def check_private_dir(path: str | os.PathLike, flag: str) -> None:
  """Refuses (:class:`UnsafeFileError`, one line naming ``flag``) a folder whose content the
  run executes (the compilation cache's native code) when it is not owned by this user
  or is writable by others."""
  info = os.stat(path)
  if info.st_uid != os.geteuid():
    problem = f"is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})"
  elif info.st_mode & stat.S_IWOTH:
    problem = "is writable by others"
  else:
    return
  raise UnsafeFileError(
      f"{flag} {path} {problem}: it holds native code the run would load and execute; use a "
      "folder of your own that others cannot write, or --compilation-cache off.")


# How tensorstore (under orbax) reports a full disk or quota: a ValueError whose text holds it.
_DISK_FULL = {errno.ENOSPC: ("No space left on device", "os_error_code='28'"),
              errno.EDQUOT: ("Disk quota exceeded", "os_error_code='122'")}


def _disk_full_errno(err: BaseException) -> int | None:
  text = str(err)
  return next((code for code, needles in _DISK_FULL.items() if any(n in text for n in needles)), None)


class _QuietDiskFull(logging.Filter):
  """Drops orbax's logged tracebacks of a full disk (the save raises it as one OSError)."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return _disk_full_errno(exc if exc is not None else record.getMessage()) is None


@contextlib.contextmanager
def disk_full_as_os_error(where: Path) -> Iterator[None]:
  """A full disk or quota inside orbax's write (tensorstore's ValueError, logged from its
  threads) becomes ``OSError(ENOSPC / EDQUOT)`` naming ``where``: one line for the CLI.

  While orbax writes, its loggers drop their reports of a full disk; after a full
  disk the filter stays (orbax's threads may report it later). Not caught: a report
  tensorstore may print from C ("Event loop is closed") when its callbacks outlive
  orbax's event loop after the failure (seen in 1 of 8 runs on a 3 MB file system).
  """
  quiet, loggers = _QuietDiskFull(), [logging.getLogger(name) for name in ("absl", "asyncio")]
  for logger in loggers:
    logger.addFilter(quiet)
  disk_full = None
  try:
    yield
  except Exception as err:  # pylint: disable=broad-except
    disk_full = err.errno if isinstance(err, OSError) and err.errno in _DISK_FULL else _disk_full_errno(err)
    if disk_full is None:
      raise
    raise OSError(disk_full, os.strerror(disk_full), str(where)) from None
  finally:
    if disk_full is None:
      for logger in loggers:
        logger.removeFilter(quiet)
    else:
      gc.collect()  # orbax's failed futures log "exception never retrieved" when collected: now, quietly
