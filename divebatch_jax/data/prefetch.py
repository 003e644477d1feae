"""Background threads that keep the next results of an ordered stream of work ready.

:class:`Prefetcher` applies ``fn`` to the items of ``items`` in ``num_workers``
background threads, keeping ``buffer_size`` results in flight, and hands them
out in the order of ``items`` -- so the host assembles (and transfers) the
following batches while the device computes the current step. NumPy releases
the GIL while it copies, so several workers assemble batches in parallel.
An exception raised by ``fn`` is re-raised in the consumer at the point where
its result would have come; :meth:`Prefetcher.close` cancels the work not yet
started and joins the threads.

Example::

    >>> from divebatch_jax.data import Prefetcher
    >>> with Prefetcher(iter(range(5)), lambda i: i * i, buffer_size=2) as squares:
    ...   print(list(squares))
    [0, 1, 4, 9, 16]
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Any, Callable, Generic, Iterator, TypeVar

from divebatch_jax.data._checks import int_in_range

T = TypeVar("T")


class Prefetcher(Generic[T]):
  """``fn(item)`` for each item, computed ahead in background threads, in order.

  Args:
    items: the work, consumed lazily (at most ``buffer_size`` ahead).
    fn: what to compute for each item.
    buffer_size: results in flight or ready, >= 1.
    num_workers: threads, 1 <= num_workers <= buffer_size.
  """

  def __init__(
      self,
      items: Iterator[Any],
      fn: Callable[[Any], T],
      *,
      buffer_size: int = 2,
      num_workers: int = 1,
  ):
    self._buffer_size = int_in_range("buffer_size", buffer_size, 1)
    num_workers = int_in_range("num_workers", num_workers, 1, self._buffer_size)
    self._items = items
    self._fn = fn
    self._pool = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="divebatch-prefetch")
    self._pending: collections.deque[concurrent.futures.Future] = collections.deque()
    self._exhausted = False
    self._fill()

  def _fill(self) -> None:
    while not self._exhausted and len(self._pending) < self._buffer_size:
      try:
        item = next(self._items)
      except StopIteration:
        self._exhausted = True
        return
      self._pending.append(self._pool.submit(self._fn, item))

  def __iter__(self) -> "Prefetcher[T]":
    return self

  def __next__(self) -> T:
    if not self._pending:
      raise StopIteration
    try:
      result = self._pending.popleft().result()
      self._fill()
    except BaseException:
      self.close()  # nothing after a failure: the next call ends the iteration
      raise
    return result

  def close(self) -> None:
    """Cancels the work not started, waits for the threads; pending results are dropped."""
    self._exhausted = True
    self._pending.clear()
    self._pool.shutdown(wait=True, cancel_futures=True)

  def __enter__(self) -> "Prefetcher[T]":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
