"""Batches from the user's own loader (numpy, ``tf.data``, grain) at the library's static shapes.

A jitted step compiles once per input shape. A hand-written loop whose batch size
grows, and whose epochs end with a partial batch, would compile for every size it
meets; :func:`pad_batch` pads each batch to the :class:`~divebatch_jax.data.BucketLadder`
size above it (the layout :func:`~divebatch_jax.data.pad_to_bucket` uses, flattened to
``K·m`` rows) and returns the mask of real rows, so the loop compiles once per
ladder shape at most. Build the transformation with ``batch_sizes=ladder.batch_sizes(n)``
so that the policy's sizes are ladder sizes (no padding but the epoch's last batch).

Example::

    >>> import numpy as np
    >>> from divebatch_jax.data import bucket_ladder, pad_batch
    >>> ladder = bucket_ladder(4, 16)                      # sizes 4, 8, 16
    >>> batch = {"x": np.ones((5, 2), np.float32), "y": np.arange(5)}
    >>> padded, mask = pad_batch(batch, ladder)            # 5 rows -> 8
    >>> padded["x"].shape, padded["y"].tolist(), mask.tolist()
    ((8, 2), [0, 1, 2, 3, 4, 0, 0, 0], [True, True, True, True, True, False, False, False])
    >>> [len(m) for _, m in epoch_batches({"x": np.arange(10)}, 4, ladder)]   # 4 + 4 + 2 rows
    [4, 4, 4]

A loader that drops each epoch's last partial batch (``batch(b, drop_remainder=True)``)
needs ``adaptive_batch(..., drop_remainder=True)``, which ends an epoch once fewer than
b examples are left, so that its epochs and the loop's agree.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import jax
import numpy as np

from divebatch_jax.data.buckets import BucketLadder, pad_to_bucket
from divebatch_jax.data._checks import int_in_range


def _as_ladder(ladder: BucketLadder | Sequence[int]) -> BucketLadder:
  if isinstance(ladder, BucketLadder):
    return ladder
  sizes = tuple(sorted({int_in_range("ladder size", s, 1) for s in ladder}))
  if not sizes:
    raise ValueError("ladder must be a BucketLadder or a non-empty list of positive ints.")
  return BucketLadder(sizes)


def pad_batch(batch: Any, ladder: BucketLadder | Sequence[int]) -> tuple[Any, np.ndarray]:
  """``(padded, mask)``: ``batch`` (a pytree of arrays sharing their leading axis b)
  padded with zero rows to the ladder's ``K·m`` rows, and the bool ``(K·m,)`` mask.

  ``ladder`` is a :class:`BucketLadder` or a list of sizes. A batch up to the largest
  size takes the smallest size that holds it; a larger one takes K micro-batches of
  the largest size, each filled evenly (:func:`pad_to_bucket`), flattened.
  """
  ladder = _as_ladder(ladder)
  leaves, treedef = jax.tree.flatten(batch)
  if not leaves:
    raise ValueError("batch must hold at least one array.")
  padded, mask = pad_to_bucket({str(i): np.asarray(leaf) for i, leaf in enumerate(leaves)}, ladder)
  flat = [padded[str(i)].reshape((-1,) + padded[str(i)].shape[2:]) for i in range(len(leaves))]
  return jax.tree.unflatten(treedef, flat), mask.reshape(-1)


def epoch_batches(
    arrays: Any,
    batch_size: int,
    ladder: BucketLadder | Sequence[int],
    *,
    order: np.ndarray | None = None,
    drop_remainder: bool = False,
) -> Iterator[tuple[Any, np.ndarray]]:
  """One epoch of in-memory ``arrays`` (a pytree of numpy arrays, n rows) in batches of
  ``batch_size`` rows in ``order`` (a permutation; None for 0..n−1), each through
  :func:`pad_batch`. The last batch holds the rest, or is dropped with ``drop_remainder``."""
  leaves = jax.tree.leaves(arrays)
  n = len(leaves[0])
  batch_size = int_in_range("batch_size", batch_size, 1)
  order = np.arange(n) if order is None else np.asarray(order)
  stop = n - n % batch_size if drop_remainder else n
  for start in range(0, stop, batch_size):
    rows = order[start:start + batch_size]
    yield pad_batch(jax.tree.map(lambda a: np.asarray(a)[rows], arrays), ladder)
