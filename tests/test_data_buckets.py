"""Bucket ladder, (K, m) layout, padding bounds and pad_to_bucket against brute force."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from divebatch_jax.data import (
    BucketLadder,
    bucket_ladder,
    micro_batch_counts,
    pad_to_bucket,
    padding_fraction,
    worst_case_padding,
)


def _brute_shape(sizes, rows):
  """Smallest single bucket that holds ``rows``; else the fewest max-size micro-batches."""
  fitting = [s for s in sizes if s >= rows]
  if fitting:
    return 1, min(fitting)
  k = 1
  while k * max(sizes) < rows:
    k += 1
  return k, max(sizes)


def test_doubling_ladder():
  assert bucket_ladder(128, 512).sizes == (128, 256, 512)
  assert bucket_ladder(128, 2048).sizes == (128, 256, 512, 1024, 2048)
  assert bucket_ladder(100, 1000).sizes == (100, 200, 400, 800, 1000)
  assert bucket_ladder(64, 64).sizes == (64,)


def test_multiple_of_rounds_every_size_up():
  ladder = bucket_ladder(100, 1000, multiple_of=8)
  assert ladder.sizes == (104, 200, 400, 800, 1000)
  assert all(s % 8 == 0 for s in ladder.sizes)
  assert bucket_ladder(3, 10, multiple_of=4).sizes == (4, 8, 12)  # 3, 6 -> 4, 8; 10 -> 12


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 300), st.integers(0, 700), st.integers(1, 16),
    st.sampled_from([1.5, 2, 3, 4]), st.integers(1, 5000),
)
def test_shape_for_matches_brute_force(min_size, extra, multiple_of, growth, rows):
  ladder = bucket_ladder(min_size, min_size + extra, multiple_of=multiple_of, growth=growth)
  sizes = ladder.sizes
  assert list(sizes) == sorted(set(sizes)) and all(s % multiple_of == 0 for s in sizes)
  assert sizes[0] >= min_size and sizes[-1] >= min_size + extra
  assert ladder.shape_for(rows) == _brute_shape(sizes, rows)


@pytest.mark.parametrize("min_size, max_size, multiple_of", [(128, 512, 1), (100, 1000, 8), (3, 10, 4)])
def test_shapes_and_worst_case_padding_match_brute_force(min_size, max_size, multiple_of):
  ladder = bucket_ladder(min_size, max_size, multiple_of=multiple_of)
  top = 5 * ladder.max_size
  shapes = {ladder.shape_for(rows) for rows in range(1, top + 1)}
  assert sorted(shapes) == sorted(ladder.shapes_up_to(top))
  fractions = {rows: 1 - rows / (k * m) for rows in range(1, top + 1) for k, m in [_brute_shape(ladder.sizes, rows)]}
  for lo, hi in [(1, top), (min_size, top), (min_size, max_size), (max_size + 1, top), (7, 7)]:
    expected = max(fractions[r] for r in range(lo, hi + 1))
    assert worst_case_padding(ladder, lo, hi) == pytest.approx(expected, abs=1e-12)
    assert padding_fraction(ladder, hi) == pytest.approx(fractions[hi], abs=1e-12)


def test_documented_padding_bounds_for_doubling_ladder():
  ladder = bucket_ladder(128, 512)
  assert worst_case_padding(ladder, 128, 512) < 0.5  # b >= s_0: below 1 - 1/growth
  assert worst_case_padding(ladder, 128, 512) == pytest.approx(1 - 257 / 512)
  assert worst_case_padding(ladder, 513, 2048) == pytest.approx(1 - 513 / 1024)  # K = 2 worst
  assert worst_case_padding(ladder, 1, 512) == pytest.approx(1 - 1 / 128)  # a 1-row last step


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400), st.integers(1, 9))
def test_micro_batch_counts_are_even(rows, k):
  counts = micro_batch_counts(rows, k)
  assert counts.sum() == rows and len(counts) == k and counts.max() - counts.min() <= 1


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 700))
def test_pad_to_bucket_keeps_every_real_row_in_order(rows):
  ladder = bucket_ladder(16, 64, multiple_of=4)
  rng = np.random.default_rng(rows)
  batch = {
      "x": rng.normal(size=(rows, 3, 2)).astype(np.float32),
      "y": rng.integers(0, 10, rows).astype(np.int32),
  }
  padded, mask = pad_to_bucket(batch, ladder)
  k, m = ladder.shape_for(rows)
  assert mask.shape == (k, m) and mask.dtype == bool
  assert padded["x"].shape == (k, m, 3, 2) and padded["y"].shape == (k, m)
  assert padded["x"].dtype == np.float32 and padded["y"].dtype == np.int32
  # Brute force: walk the micro-batches row by row.
  real_x, real_y = [], []
  for i in range(k):
    seen_padding = False
    for j in range(m):
      if mask[i, j]:
        assert not seen_padding  # real rows come first in each micro-batch
        real_x.append(padded["x"][i, j])
        real_y.append(padded["y"][i, j])
      else:
        seen_padding = True
        assert not padded["x"][i, j].any() and padded["y"][i, j] == 0
  assert np.array_equal(np.stack(real_x), batch["x"]) and np.array_equal(real_y, batch["y"])
  assert mask.sum(axis=1).max() - mask.sum(axis=1).min() <= 1  # equal micro-batches


def test_pad_to_bucket_rejects_ragged_batch():
  with pytest.raises(ValueError, match="leading dimension"):
    pad_to_bucket({"x": np.zeros((3, 2)), "y": np.zeros(4)}, BucketLadder((8,)))


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0, 8), {}, "min_size"),
        ((16, 8), {}, r"max_size must be an int in >= 16"),
        ((4, 8.5), {}, "max_size must be an int"),
        ((4, 8), dict(multiple_of=0), "multiple_of"),
        ((4, 8), dict(growth=1), "growth"),
    ],
)
def test_bad_ladder_arguments_are_named(args, kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    bucket_ladder(*args, **kwargs)


def test_shape_for_rejects_non_positive_rows():
  with pytest.raises(ValueError, match="num_rows"):
    bucket_ladder(4, 8).shape_for(0)


@pytest.mark.parametrize("min_size, max_size, max_rows", [(16, 128, 1000), (32, 32, 100), (8, 64, 50), (5, 40, 400)])
def test_batch_sizes_are_exactly_the_sizes_without_padding(min_size, max_size, max_rows):
  ladder = bucket_ladder(min_size, max_size)
  brute = tuple(b for b in range(min_size, max_rows + 1) if padding_fraction(ladder, b) == 0.0)
  assert ladder.batch_sizes(max_rows) == brute
