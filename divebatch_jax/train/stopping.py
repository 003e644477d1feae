"""SIGTERM and SIGINT as a request to stop: the run finishes its step, checkpoints and exits.

While :func:`on_signals` is active (in the main thread), the first SIGTERM or
SIGINT only records itself in the yielded :class:`StopRequest`; the training
loop checks it after every step, writes a checkpoint of the partly trained
epoch and raises :class:`Interrupted`, which the CLI prints as one line and
turns into the exit status 128 + signal (143 for SIGTERM, 130 for SIGINT), as a
shell reports a process killed by that signal. The handlers are the previous
ones again from the first signal on, so a second signal acts at once (SIGKILL
always does; the run then resumes from its last committed checkpoint); the CLI
reports a second SIGINT's KeyboardInterrupt as the one line :data:`AT_ONCE`::

    with stopping.on_signals() as stop:
      for batch in batches:
        state = step(state, batch)
        if stop.signum is not None:
          save(state)
          raise stopping.Interrupted(stop.signum, "checkpoint written")
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# What the CLI prints when a second SIGINT (KeyboardInterrupt) stops the run at once.
AT_ONCE = ("stopped at once by SIGINT (a second Ctrl-C, or one outside training); nothing committed "
           "is lost: --resume continues from the last committed checkpoint")


class StopRequest:
  """``signum``: the signal that asked the run to stop, None until one arrives."""

  def __init__(self):
    self.signum: int | None = None


class Interrupted(Exception):
  """The run stopped on a signal after writing a checkpoint; ``exit_status`` is 128 + signal."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum
    self.exit_status = 128 + signum


@contextlib.contextmanager
def on_signals(signals: tuple[int, ...] = SIGNALS) -> Iterator[StopRequest]:
  """Records the first of ``signals`` in the yielded request instead of acting on it.

  Outside the main thread (where Python cannot install handlers) the request
  never fires and the signals keep their handlers.
  """
  request = StopRequest()
  if threading.current_thread() is not threading.main_thread():
    yield request
    return
  previous = {s: signal.getsignal(s) for s in signals}

  def restore():
    for s, handler in previous.items():
      signal.signal(s, handler)

  def record(signum, frame):
    request.signum = signum
    restore()

  for s in signals:
    signal.signal(s, record)
  try:
    yield request
  finally:
    restore()


def describe(signum: int) -> str:
  """``SIGTERM`` for 15, ..."""
  return signal.Signals(signum).name
