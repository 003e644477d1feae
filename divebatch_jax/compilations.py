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
  :meth:`start`); ``seconds`` their total duration; ``by_function`` the counts
  per compiled function name (jax names a jitted ``step`` ``jit_step``).
  """

  def __init__(self):
    self.count = 0
    self.seconds = 0.0
    self.by_function: dict[str, int] = {}
    self._lock = threading.Lock()
    self._active = False

  def _listener(self, event: str, duration: float, **kwargs) -> None:
    if event == BACKEND_COMPILE_EVENT:
      name = str(kwargs.get("fun_name", "?"))
      with self._lock:
        self.count += 1
        self.seconds += duration
        self.by_function[name] = self.by_function.get(name, 0) + 1

  def count_of(self, name: str) -> int:
    """Compilations of functions whose name contains ``name`` (e.g. ``"train_step"``)."""
    return sum(c for f, c in self.by_function.items() if name in f)

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
