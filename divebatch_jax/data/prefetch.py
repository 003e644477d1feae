"""A background thread that keeps the next items of an iterator ready.

:class:`Prefetcher` runs ``iterator`` in a daemon thread and buffers up to
``buffer_size`` items in a queue, so the host assembles (and transfers) batch
``t + 1`` while the device computes step ``t``. Items arrive in order; an
exception raised by the iterator is re-raised in the consumer at the point where
the item would have come; :meth:`Prefetcher.close` stops and joins the thread even
while it waits on a full queue.

Example::

    from divebatch_jax.data import Prefetcher

    with Prefetcher(iter(range(5)), buffer_size=2) as items:
      print(list(items))        # [0, 1, 2, 3, 4]
"""

from __future__ import annotations

import queue
import threading
from typing import Generic, Iterator, NamedTuple, TypeVar

from divebatch_jax.data._checks import int_in_range

T = TypeVar("T")

_POLL_SECONDS = 0.05


class _Failure(NamedTuple):
  error: BaseException


_END = object()


class Prefetcher(Generic[T]):
  """Iterates ``iterator`` in a background thread, ``buffer_size`` (>= 1) items ahead."""

  def __init__(self, iterator: Iterator[T], buffer_size: int = 2):
    buffer_size = int_in_range("buffer_size", buffer_size, 1)
    self._queue: queue.Queue = queue.Queue(maxsize=buffer_size)
    self._stop = threading.Event()
    self._finished = False
    self._thread = threading.Thread(
        target=self._run, args=(iterator,), name="divebatch-prefetch", daemon=True
    )
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=_POLL_SECONDS)
        return True
      except queue.Full:
        continue
    return False

  def _run(self, iterator: Iterator[T]) -> None:
    try:
      for item in iterator:
        if not self._put(item):
          return
    except BaseException as error:  # handed to the consumer, re-raised there
      self._put(_Failure(error))
      return
    self._put(_END)

  def __iter__(self) -> "Prefetcher[T]":
    return self

  def __next__(self) -> T:
    if self._finished:
      raise StopIteration
    item = self._queue.get()
    if item is _END:
      self._finished = True
      raise StopIteration
    if isinstance(item, _Failure):
      self._finished = True
      raise item.error
    return item

  def close(self) -> None:
    """Stops the thread and waits for it; buffered items are dropped."""
    self._stop.set()
    self._finished = True
    while self._thread.is_alive():
      try:
        self._queue.get_nowait()
      except queue.Empty:
        pass
      self._thread.join(timeout=_POLL_SECONDS)

  def __enter__(self) -> "Prefetcher[T]":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
