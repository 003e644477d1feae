"""Ahead-of-time executables: compile once per argument signature, from any thread.

``jax.jit(f).lower(shapes).compile()`` compiles without running, but the executable
it returns is not seen by later ``jax.jit(f)(...)`` calls, which compile again.
:class:`Executables` therefore keeps the compiled executables itself, keyed by a
name and the arguments' shapes, dtypes and shardings (an executable runs only on the
input shardings it was compiled for), and the caller runs them directly. A
background thread can fill it ahead of need (inside :meth:`Executables.ahead`)
while another thread trains; a call that needs an executable being compiled
waits for it instead of compiling it twice. ``stall_seconds`` is the time calls
outside :meth:`~Executables.ahead` spent compiling or waiting: the compile time on
the training thread's critical path.

Used by :class:`divebatch_jax.transform.TrainStep` and :class:`divebatch_jax.data.Pipeline`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Hashable, Iterator

import jax
import jax.numpy as jnp


def _signature(x) -> tuple:
  """Shape, dtype and sharding from attributes (fast: this runs for every leaf of every
  call). A sharding over one device counts as none: an array on the default device and a
  shape without a sharding compile alike."""
  shape = getattr(x, "shape", None)
  if shape is None:  # a Python scalar
    return (jnp.shape(x), jnp.result_type(x), None)
  sharding = getattr(x, "sharding", None)
  if sharding is not None and sharding.num_devices == 1:
    sharding = None
  return (shape, x.dtype, sharding)


class Executables:
  """Compiled executables by ``(name, argument signature)``; thread-safe."""

  def __init__(self):
    self._compiled: dict[tuple, Any] = {}
    self._pending: dict[tuple, threading.Event] = {}
    self._lock = threading.Lock()
    self._local = threading.local()
    self.stall_seconds = 0.0

  @contextlib.contextmanager
  def ahead(self) -> Iterator[None]:
    """Compiles made inside are ahead of need: not counted in ``stall_seconds``."""
    self._local.ahead = True
    try:
      yield
    finally:
      self._local.ahead = False

  def get(self, name: Hashable, make: Callable[[], Any], args: tuple) -> Any:
    """The executable of ``make()`` (a ``jax.jit``-wrapped function) for the shapes of ``args``.

    ``args`` may hold arrays or ``jax.ShapeDtypeStruct`` (with shardings where the
    arrays will have them); the executable is keyed by shapes, dtypes and shardings
    over several devices (one device's counts as none).
    """
    leaves, structure = jax.tree.flatten(args)
    key = (name, structure, tuple(_signature(x) for x in leaves))
    with self._lock:
      if key in self._compiled:
        return self._compiled[key]
    start = time.perf_counter()
    try:
      while True:
        with self._lock:
          if key in self._compiled:
            return self._compiled[key]
          event = self._pending.get(key)
          if event is None:
            event = self._pending[key] = threading.Event()
            break
        event.wait()
      try:
        compiled = make().lower(*args).compile()
        with self._lock:
          self._compiled[key] = compiled
        return compiled
      finally:
        with self._lock:
          self._pending.pop(key, None)
        event.set()
    finally:
      if not getattr(self._local, "ahead", False):
        self.stall_seconds += time.perf_counter() - start
