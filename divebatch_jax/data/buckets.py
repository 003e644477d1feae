"""Re-batching to a few static shapes, with a mask for the padded rows.

A jitted step recompiles for every new input shape. A :class:`BucketLadder` fixes
the micro-batch sizes ``s_0 < s_1 < ... < s_L = M`` (each a multiple of
``multiple_of``, e.g. the device count); a step of ``b`` real rows is laid out as
``(K, m)`` rows:

    b <= M:  K = 1,          m = the smallest s_i >= b
    b >  M:  K = ceil(b/M),  m = M   (micro-batches accumulated by the step)

The ``b`` real rows are spread over the ``K`` micro-batches as evenly as possible
(counts differ by at most one; no micro-batch is all padding), each padded with
zero rows to ``m``; the mask is True on real rows. Padding fraction
``1 − b / (K·m)``. With consecutive sizes at most a factor ``g`` apart it is below
``1 − 1/g`` for every ``b >= s_0`` (below 1/2 for the default doubling ladder) and
below ``1/K`` once micro-batches are accumulated; only a step with fewer than
``s_0`` rows (the last step of an epoch) can waste more, at most ``s_0 − 1`` rows.
:func:`worst_case_padding` gives the exact bound of a ladder.

Example::

    >>> import numpy as np
    >>> from divebatch_jax.data import bucket_ladder, pad_to_bucket
    >>> ladder = bucket_ladder(128, 512)
    >>> ladder.sizes, ladder.shape_for(300), ladder.shape_for(1500)
    ((128, 256, 512), (1, 512), (3, 512))
    >>> batch = {"x": np.ones((300, 4), np.float32), "y": np.zeros(300, np.int32)}
    >>> padded, mask = pad_to_bucket(batch, ladder)
    >>> padded["x"].shape, mask.shape, int(mask.sum())
    ((1, 512, 4), (1, 512), 300)
    >>> padded, mask = pad_to_bucket({"x": np.arange(1.0, 6.0)}, bucket_ladder(2, 4))  # b = 5 > M = 4
    >>> padded["x"]
    array([[1., 2., 3., 0.],
           [4., 5., 0., 0.]])
    >>> mask
    array([[ True,  True,  True, False],
           [ True,  True, False, False]])
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple

import numpy as np

from divebatch_jax.data._checks import int_in_range


def round_up(value: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is >= ``value`` (e.g. rows over devices)."""
  return -(-value // multiple) * multiple


class BucketLadder(NamedTuple):
  """Ascending micro-batch sizes; the largest, ``max_size``, is the accumulation unit."""

  sizes: tuple[int, ...]

  @property
  def max_size(self) -> int:
    return self.sizes[-1]

  def shape_for(self, num_rows: int) -> tuple[int, int]:
    """``(K, m)``: micro-batches and rows per micro-batch for ``num_rows`` real rows."""
    num_rows = int_in_range("num_rows", num_rows, 1)
    if num_rows > self.max_size:
      return -(-num_rows // self.max_size), self.max_size
    return 1, next(s for s in self.sizes if s >= num_rows)

  def batch_sizes(self, max_rows: int) -> tuple[int, ...]:
    """The batch sizes up to ``max_rows`` laid out with no padding row: the ladder's
    sizes, then every multiple of the largest (K full micro-batches). A policy's
    choices rounded to these (``adaptive_batch(batch_sizes=...)``) waste nothing."""
    max_rows = int_in_range("max_rows", max_rows, 1)
    multiples = range(2 * self.max_size, max_rows + 1, self.max_size)
    return tuple(s for s in self.sizes if s <= max_rows) + tuple(multiples)

  def shapes_up_to(self, max_rows: int) -> list[tuple[int, int]]:
    """Every ``(K, m)`` a step of 1..``max_rows`` rows can take: the compile budget."""
    max_rows = int_in_range("max_rows", max_rows, 1)
    last_k, last_m = self.shape_for(max_rows)
    if last_k == 1:
      return [(1, s) for s in self.sizes if s <= last_m]
    return [(1, s) for s in self.sizes] + [(k, self.max_size) for k in range(2, last_k + 1)]


def bucket_ladder(
    min_size: int, max_size: int, *, multiple_of: int = 1, growth: float = 2.0
) -> BucketLadder:
  """Sizes ``min_size · growth^i`` below ``max_size``, then ``max_size``.

  Each size is rounded up to a multiple of ``multiple_of`` (duplicates dropped).

  Args:
    min_size: the smallest bucket (e.g. the initial batch size), >= 1.
    max_size: the largest micro-batch one step evaluates at once (all devices
      together), >= ``min_size``; larger batches are accumulated in micro-batches
      of this size.
    multiple_of: every size is divisible by it (the number of devices a batch is
      sharded over), >= 1.
    growth: ratio between consecutive sizes, > 1; padding stays below
      ``1 − 1/growth`` for batches of at least ``min_size`` rows.
  """
  min_size = int_in_range("min_size", min_size, 1)
  max_size = int_in_range("max_size", max_size, min_size)
  multiple_of = int_in_range("multiple_of", multiple_of, 1)
  if not (isinstance(growth, (int, float)) and growth > 1):
    raise ValueError(f"growth must be a number > 1, got {growth!r}.")
  sizes = {round_up(max_size, multiple_of)}
  size = float(min_size)
  while size < max_size:
    sizes.add(round_up(math.ceil(size), multiple_of))
    size *= growth
  return BucketLadder(tuple(sorted(sizes)))


def padding_fraction(ladder: BucketLadder, num_rows: int) -> float:
  """``1 − num_rows / (K·m)``: the share of padded rows in a step of ``num_rows``."""
  k, m = ladder.shape_for(num_rows)
  return 1.0 - num_rows / (k * m)


def worst_case_padding(ladder: BucketLadder, min_rows: int, max_rows: int) -> float:
  """The largest :func:`padding_fraction` over steps of ``min_rows..max_rows`` rows.

  Within one shape the fraction falls as rows grow, so the maximum is at the
  smallest row count of some shape: ``max(min_rows, previous capacity + 1)``.
  """
  min_rows = int_in_range("min_rows", min_rows, 1)
  max_rows = int_in_range("max_rows", max_rows, min_rows)
  candidates = [min_rows]
  capacities = [k * m for k, m in ladder.shapes_up_to(max_rows)]
  candidates += [c + 1 for c in capacities if min_rows <= c < max_rows]
  return max(padding_fraction(ladder, rows) for rows in candidates)


def micro_batch_counts(num_rows: int, num_micro_batches: int) -> np.ndarray:
  """Real rows per micro-batch: ``num_rows`` split into counts that differ by <= 1."""
  base, extra = divmod(num_rows, num_micro_batches)
  return np.array([base + 1] * extra + [base] * (num_micro_batches - extra), np.int64)


def pad_to_bucket(
    batch: Mapping[str, np.ndarray], ladder: BucketLadder
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Lays ``b`` rows out as ``(K, m, ...)`` with zero padding and a ``(K, m)`` mask.

  Real rows keep their order: micro-batch ``k`` holds the next
  ``micro_batch_counts(b, K)[k]`` rows in its first positions.
  """
  num_rows = {np.shape(v)[0] for v in batch.values()}
  if len(num_rows) != 1:
    raise ValueError(f"batch leaves must share one leading dimension, got sizes {sorted(num_rows)}.")
  num_rows = num_rows.pop()
  k, m = ladder.shape_for(num_rows)
  counts = micro_batch_counts(num_rows, k)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  mask = np.arange(m)[None, :] < counts[:, None]
  padded = {}
  for name, rows in batch.items():
    rows = np.asarray(rows)
    out = np.zeros((k, m) + rows.shape[1:], rows.dtype)
    for i in range(k):
      out[i, : counts[i]] = rows[starts[i] : starts[i] + counts[i]]
    padded[name] = out
  return padded, mask
