"""One run per ``--out``: an advisory lock on ``OUT/.lock``, held for the run's life.

Two runs writing into one directory would interleave their ``metrics.jsonl``
lines and checkpoints. :func:`hold` takes an exclusive ``flock`` on the lock file
and writes the holder's pid into it; a second run is refused with one line
naming that pid. The kernel releases the lock when its holder dies however it
dies (SIGKILL included), so the lock of a killed run is simply taken over by
the next one; the file itself stays (removing it would race with a new holder)::

    with run_lock.hold(Path("runs/a")):     # RunLocked if another live run holds it
      train()

On a file system without ``flock`` support the run goes ahead unlocked, with a note.
A symlink or a special file at ``OUT/.lock`` is refused in one line
(:class:`~divebatch_jax.train.safe_files.UnsafeFileError`), never written through.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Callable, Iterator

from divebatch_jax.train.safe_files import open_regular

LOCK_FILE = ".lock"


class RunLocked(FileExistsError):
  """Another live run holds the lock of this ``--out``; the message names its pid."""


def _holder(fd: int) -> str:
  """The pid the lock file holds (``unknown`` when empty or unreadable)."""
  try:
    text = os.pread(fd, 64, 0).decode().strip()
  except (OSError, UnicodeDecodeError):
    return "unknown"
  return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def hold(out: str | os.PathLike, *, echo: Callable[[str], None] = print) -> Iterator[Path]:
  """Holds ``out/.lock`` exclusively for the ``with`` block (``out`` is created if needed).

  Raises :class:`RunLocked` at once, without waiting, when another process holds it.
  Yields the lock file's path.
  """
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / LOCK_FILE
  fd = open_regular(path, os.O_RDWR | os.O_CREAT)  # a symlink or FIFO there: one line
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise RunLocked(
          f"--out {out} is in use by another run (pid {_holder(fd)}): wait for it to finish, "
          "or choose another --out."
      ) from None
    except OSError as err:  # no flock on this file system (some network mounts)
      echo(f"note: could not lock {path} ({err.strerror}); nothing stops a second run into --out {out}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    yield path
  finally:
    os.close(fd)  # releases the lock
