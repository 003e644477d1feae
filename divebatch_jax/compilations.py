"""Counting XLA compilations through jax's public monitoring hooks.

Every backend compilation records the duration event
``/jax/core/compile/backend_compile_duration``; :class:`CompileCounter` listens for
it. Use it to check that a new batch size does not recompile::

    with CompileCounter() as compiles:
      step(params, batch)
      step(params, batch)
    assert compiles.count == 1
"""

from __future__ import annotations

import threading

import jax.monitoring

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
  """Counts backend compilations while active (a context manager, re-entrant safe).

  ``count`` is the number of compilations since ``__enter__`` (or since
  :meth:`start`); ``seconds`` their total duration.
  """

  def __init__(self):
    self.count = 0
    self.seconds = 0.0
    self._lock = threading.Lock()
    self._active = False

  def _listener(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event == BACKEND_COMPILE_EVENT:
      with self._lock:
        self.count += 1
        self.seconds += duration

  def start(self) -> "CompileCounter":
    if not self._active:
      jax.monitoring.register_event_duration_secs_listener(self._listener)
      self._active = True
    return self

  def stop(self) -> None:
    if self._active:
      jax.monitoring.unregister_event_duration_listener(self._listener)
      self._active = False

  def __enter__(self) -> "CompileCounter":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()
