"""Prefetcher: order, look-ahead, parallel workers, exceptions reach the consumer, shutdown."""

import itertools
import random
import threading
import time

import pytest

from divebatch_jax.data import Prefetcher


def _slow_square(i):
  time.sleep(random.uniform(0, 0.01))  # workers finish out of order
  return i * i


@pytest.mark.parametrize("num_workers", [1, 3])
def test_results_arrive_in_item_order(num_workers):
  with Prefetcher(iter(range(60)), _slow_square, buffer_size=4, num_workers=num_workers) as results:
    assert list(results) == [i * i for i in range(60)]


def test_draws_items_at_most_buffer_size_ahead():
  drawn = []

  def items():
    for i in itertools.count():
      drawn.append(i)
      yield i

  with Prefetcher(items(), lambda i: i, buffer_size=3, num_workers=2) as results:
    assert len(drawn) == 3  # all in flight before the first request
    assert next(results) == 0 and next(results) == 1
    assert len(drawn) == 5  # 2 consumed + 3 in flight


def test_workers_run_in_parallel():
  def wait(i):
    time.sleep(0.2)
    return i

  start = time.monotonic()
  with Prefetcher(iter(range(8)), wait, buffer_size=4, num_workers=4) as results:
    assert list(results) == list(range(8))
  assert time.monotonic() - start < 1.2  # one thread would need 1.6 s


def test_exception_propagates_after_earlier_results():
  def fn(i):
    if i == 2:
      raise KeyError("broken example 2")
    return i

  results = Prefetcher(iter(range(10)), fn, buffer_size=2)
  assert next(results) == 0 and next(results) == 1
  with pytest.raises(KeyError, match="broken example 2"):
    next(results)
  with pytest.raises(StopIteration):
    next(results)


def test_close_cancels_pending_work_and_joins_threads():
  started = []

  def fn(i):
    started.append(i)
    time.sleep(0.05)
    return i

  before = threading.active_count()
  results = Prefetcher(itertools.count(), fn, buffer_size=6, num_workers=2)
  assert next(results) == 0
  results.close()
  assert threading.active_count() == before
  assert len(started) < 8  # queued work was cancelled, not run
  with pytest.raises(StopIteration):
    next(results)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(buffer_size=0), "buffer_size"), (dict(buffer_size=2, num_workers=3), r"num_workers must be an int in \[1, 2\]")],
)
def test_bad_sizes_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Prefetcher(iter([]), lambda i: i, **kwargs)
