"""Counting XLA compilations through jax's public monitoring hooks.

Every backend compilation records the duration event
``/jax/core/compile/backend_compile_duration``; :class:`CompileCounter` listens for
it. An executable loaded from the persistent compilation cache records the same
event after ``/jax/compilation_cache/cache_hits``; those loads are counted apart
(``cache_loads``), not as compilations. Use it to check what a step compiles (once per
input shape)::

    >>> import jax, jax.numpy as jnp
    >>> from divebatch_jax import CompileCounter
    >>> @jax.jit
    ... def step(w, x):
    ...   return w - 0.1 * x.sum(0)
    >>> w, batch, bigger = jnp.zeros(3), jnp.ones((4, 3)), jnp.ones((8, 3))
    >>> with CompileCounter() as compiles:
    ...   w = step(w, batch)
    ...   w = step(w, batch)                  # same shapes: no second compilation
    >>> compiles.count, compiles.by_function
    (1, {'jit(step)': 1})
    >>> with CompileCounter() as compiles:
    ...   w = step(w, bigger)                 # a new batch size: a new executable
    >>> compiles.count_of("step")
    1
"""

from __future__ import annotations

import threading

import jax.monitoring

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class CompileCounter:
  """Counts backend compilations while active (a context manager, re-entrant safe).

  ``count`` is the number of compilations since ``__enter__`` (or since
  :meth:`start`); ``seconds`` their total duration; ``by_function`` the counts
  per compiled function name (jax names a jitted ``step`` ``jit_step``);
  ``cache_loads`` the executables loaded from the persistent cache instead.
  """

  def __init__(self):
    self.count = 0
    self.seconds = 0.0
    self.by_function: dict[str, int] = {}
    self.cache_loads = 0
    self._loading = threading.local()  # a cache hit, then its duration event, on one thread
    self._lock = threading.Lock()
    self._active = False

  def _hit_listener(self, event: str, **kwargs) -> None:
    if event == CACHE_HIT_EVENT:
      self._loading.hit = True

  def _listener(self, event: str, duration: float, **kwargs) -> None:
    if event == BACKEND_COMPILE_EVENT and getattr(self._loading, "hit", False):
      self._loading.hit = False
      with self._lock:
        self.cache_loads += 1
    elif event == BACKEND_COMPILE_EVENT:
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
      jax.monitoring.register_event_listener(self._hit_listener)
      self._active = True
    return self

  def stop(self) -> None:
    if self._active:
      jax.monitoring.unregister_event_duration_listener(self._listener)
      jax.monitoring.unregister_event_listener(self._hit_listener)
      self._active = False

  def __enter__(self) -> "CompileCounter":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()
