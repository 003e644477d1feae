"""EpochSampler: exactly once per epoch under any batch-size schedule, exact resume."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from divebatch_jax.data import EpochSampler, SamplerState, epoch_order


@st.composite
def schedules(draw):
  """A data-set size, a seed and a batch-size schedule covering 1-3 epochs."""
  n = draw(st.integers(1, 300))
  seed = draw(st.integers(0, 2**32 - 1))
  sizes = draw(st.lists(st.integers(1, n), min_size=1, max_size=60))
  return n, seed, sizes


def _run_epochs(sampler, sizes, num_epochs):
  """Steps cycling through ``sizes`` until ``num_epochs`` epochs are done: [(state, indices)]."""
  steps = []
  while sampler.state.epoch < num_epochs:
    before = sampler.state
    steps.append((before, sampler.next_indices(sizes[len(steps) % len(sizes)])))
  return steps


@settings(max_examples=1000, deadline=None)
@given(schedules())
def test_every_example_exactly_once_per_epoch(case):
  n, seed, sizes = case
  sampler = EpochSampler(n, seed=seed)
  steps = _run_epochs(sampler, sizes, num_epochs=2)
  for epoch in range(2):
    parts = [idx for state, idx in steps if state.epoch == epoch]
    served = np.concatenate(parts)
    assert np.array_equal(np.sort(served), np.arange(n))  # every example exactly once
    # Step contract: min(b, n - position) examples, in the epoch's order.
    position = 0
    for (state, idx), b in zip(steps, sizes * len(steps)):
      if state.epoch == epoch:
        assert state.position == position and len(idx) == min(b, n - position)
        position += len(idx)
    assert np.array_equal(served, epoch_order(n, seed, epoch))


@settings(max_examples=200, deadline=None)
@given(schedules(), st.data())
def test_resume_equals_uninterrupted_stream(case, data):
  n, seed, sizes = case
  full = _run_epochs(EpochSampler(n, seed=seed), sizes, num_epochs=2)
  cut = data.draw(st.integers(0, len(full) - 1))
  resumed = EpochSampler(n, seed=seed, state=full[cut][0])
  for i in range(cut, len(full)):
    state, idx = full[i]
    assert resumed.state == state
    assert np.array_equal(resumed.next_indices(sizes[i % len(sizes)]), idx)


def test_epoch_order_depends_only_on_seed_and_epoch():
  a = EpochSampler(50, seed=3)
  for size in (7, 50, 3, 11, 50):  # a different history
    a.next_indices(size)
  b = EpochSampler(50, seed=3)
  assert np.array_equal(a.order(4), b.order(4))
  assert np.array_equal(a.order(4), np.random.default_rng((3, 4)).permutation(50))
  assert not np.array_equal(a.order(4), a.order(5))
  assert not np.array_equal(a.order(4), EpochSampler(50, seed=4).order(4))


def test_shuffle_false_serves_in_order_and_rolls_over():
  sampler = EpochSampler(5, shuffle=False)
  assert sampler.next_indices(3).tolist() == [0, 1, 2]
  assert sampler.next_indices(3).tolist() == [3, 4]  # last step of the epoch: the rest
  assert sampler.state == SamplerState(1, 0)
  assert sampler.next_indices(5).tolist() == [0, 1, 2, 3, 4]


def test_order_is_read_only():
  with pytest.raises(ValueError):
    EpochSampler(4).order(0)[0] = 1


@pytest.mark.parametrize(
    "batch_size, error, words",
    [
        (0, ValueError, "positive"),
        (-3, ValueError, "positive"),
        (11, ValueError, "at most 10"),
        (2.0, TypeError, "int"),
        ("4", TypeError, "int"),
        (True, TypeError, "bool"),
    ],
)
def test_bad_batch_size_is_named(batch_size, error, words):
  with pytest.raises(error, match="batch_size") as info:
    EpochSampler(10).next_indices(batch_size)
  assert words in str(info.value)


def test_numpy_integer_batch_size_is_accepted():
  assert len(EpochSampler(10).next_indices(np.int64(4))) == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_examples=0), "num_examples"),
        (dict(num_examples=5, seed=-1), "seed"),
        (dict(num_examples=5, state=SamplerState(0, 5)), r"state.position must be an int in \[0, 4\]"),
        (dict(num_examples=5, state=SamplerState(-1, 0)), "state.epoch"),
        (dict(num_examples=5, state=(1,)), "SamplerState"),
    ],
)
def test_bad_construction_is_named(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    EpochSampler(**kwargs)
