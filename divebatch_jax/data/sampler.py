"""Epoch-wise shuffling with a batch size that may change between any two steps.

Epoch ``e`` visits the examples in the order ``π_e`` = a permutation that depends
only on ``(seed, e)``. A step with batch size ``b`` at position ``p`` of the epoch
takes the next ``min(b, n − p)`` examples of ``π_e`` -- the last step of an epoch
takes the rest, so every example is used exactly once per epoch whatever the
sequence of batch sizes -- and the position advances by that count; at ``p = n``
the sampler moves to ``(e + 1, 0)``. The state ``(epoch, position)`` is all there
is to resume from.

Example (a step of 8 at position 4 of 10 takes the remaining 6; the epoch ends there)::

    >>> import numpy as np
    >>> from divebatch_jax.data import EpochSampler
    >>> sampler = EpochSampler(10, seed=0)
    >>> a = sampler.next_indices(4)
    >>> sampler.state
    SamplerState(epoch=0, position=4)
    >>> b = sampler.next_indices(8)
    >>> len(a), len(b), sampler.state
    (4, 6, SamplerState(epoch=1, position=0))
    >>> epoch = np.concatenate([a, b])              # every example once, in epoch 0's order
    >>> sorted(epoch.tolist()), bool(np.array_equal(epoch, sampler.order(0)))
    ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], True)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from divebatch_jax.data._checks import as_int, int_in_range


class SamplerState(NamedTuple):
  """Where the next step starts: ``position`` examples of ``epoch`` are used."""

  epoch: int
  position: int


def check_batch_size(batch_size: Any, num_examples: int) -> int:
  """``batch_size`` as an int in ``[1, num_examples]``, else a TypeError/ValueError."""
  batch_size = as_int("batch_size", batch_size)
  if batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size}.")
  if batch_size > num_examples:
    raise ValueError(
        f"batch_size={batch_size} is larger than the data set ({num_examples} examples): "
        f"use at most {num_examples} (e.g. cap the policy's max_batch_size)."
    )
  return batch_size


def check_state(state: Any, num_examples: int) -> SamplerState:
  """``state`` as a :class:`SamplerState` with ``epoch >= 0``, ``0 <= position < n``."""
  try:
    epoch, position = state
  except (TypeError, ValueError):
    raise TypeError(f"state must be a SamplerState(epoch, position), got {state!r}.") from None
  return SamplerState(
      int_in_range("state.epoch", epoch, 0),
      int_in_range("state.position", position, 0, num_examples - 1),
  )


def advance(state: SamplerState, num_taken: int, num_examples: int) -> SamplerState:
  """The state after a step that took ``num_taken`` examples (rolls over at ``n``)."""
  position = state.position + num_taken
  if position >= num_examples:
    return SamplerState(state.epoch + 1, 0)
  return SamplerState(state.epoch, position)


def epoch_order(num_examples: int, seed: int, epoch: int, *, shuffle: bool = True) -> np.ndarray:
  """π_e: a permutation of ``range(num_examples)`` that depends only on ``(seed, epoch)``.

  ``arange(num_examples)`` when ``shuffle`` is False.
  """
  if not shuffle:
    return np.arange(num_examples)
  return np.random.default_rng((seed, epoch)).permutation(num_examples)


class EpochSampler:
  """Indices for steps of any batch size, each example once per epoch.

  Args:
    num_examples: size n of the data set (>= 1).
    seed: non-negative int; epoch ``e``'s order is ``epoch_order(n, seed, e)``.
    shuffle: False visits ``0..n-1`` in order every epoch (evaluation).
    state: where to start (default: epoch 0, position 0).
  """

  def __init__(
      self,
      num_examples: int,
      *,
      seed: int = 0,
      shuffle: bool = True,
      state: SamplerState = SamplerState(0, 0),
  ):
    self.num_examples = int_in_range("num_examples", num_examples, 1)
    self.seed = int_in_range("seed", seed, 0)
    self.shuffle = bool(shuffle)
    self._state = check_state(state, self.num_examples)
    self._order_epoch = -1
    self._order = np.empty(0, np.int64)

  @property
  def state(self) -> SamplerState:
    return self._state

  def restore(self, state: SamplerState) -> None:
    """Continues from ``state`` exactly as the uninterrupted sampler would."""
    self._state = check_state(state, self.num_examples)

  def order(self, epoch: int) -> np.ndarray:
    """π_epoch (read-only; cached for the latest epoch asked for)."""
    if epoch != self._order_epoch:
      self._order = epoch_order(self.num_examples, self.seed, epoch, shuffle=self.shuffle)
      self._order.setflags(write=False)
      self._order_epoch = epoch
    return self._order

  def next_indices(self, batch_size: int) -> np.ndarray:
    """The next ``min(batch_size, n − position)`` indices of this epoch's order."""
    batch_size = check_batch_size(batch_size, self.num_examples)
    epoch, position = self._state
    indices = self.order(epoch)[position : position + batch_size]
    self._state = advance(self._state, len(indices), self.num_examples)
    return indices
