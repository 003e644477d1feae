"""Prefetcher: order, look-ahead, exceptions reach the consumer, clean shutdown."""

import threading
import time

import pytest

from divebatch_jax.data import Prefetcher


def test_items_arrive_in_order():
  with Prefetcher(iter(range(100)), buffer_size=3) as items:
    assert list(items) == list(range(100))


def test_runs_ahead_by_buffer_size_while_consumer_waits():
  produced = []

  def source():
    for i in range(10):
      produced.append(i)
      yield i

  with Prefetcher(source(), buffer_size=2) as items:
    assert next(items) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 4 and time.monotonic() < deadline:
      time.sleep(0.01)
    time.sleep(0.05)
    # 1 consumed + 2 buffered + 1 produced and waiting for room: no further.
    assert len(produced) == 4


def test_exception_propagates_after_earlier_items():
  def source():
    yield 1
    yield 2
    raise KeyError("broken example 3")

  items = Prefetcher(source(), buffer_size=2)
  assert next(items) == 1 and next(items) == 2
  with pytest.raises(KeyError, match="broken example 3"):
    next(items)
  with pytest.raises(StopIteration):
    next(items)
  items.close()


def test_close_stops_a_producer_blocked_on_a_full_queue():
  def endless():
    i = 0
    while True:
      yield i
      i += 1

  before = threading.active_count()
  items = Prefetcher(endless(), buffer_size=1)
  assert next(items) == 0
  items.close()
  assert not items._thread.is_alive()
  assert threading.active_count() == before
  with pytest.raises(StopIteration):
    next(items)


def test_bad_buffer_size_is_named():
  with pytest.raises(ValueError, match="buffer_size"):
    Prefetcher(iter([]), buffer_size=0)
