"""Batch-size schedules: constant, AdaBatch and SEBS (no statistics needed).

* :func:`constant` keeps ``b0``.
* :func:`adabatch` (Devarakonda et al. 2017): every ``every`` epochs
  ``b ← min(factor·b, b_max)`` and the policy's lr multiplier ``← lr_factor·m``.
  The paper's CIFAR setting is ``factor=2, every=20, lr_factor=0.75`` with
  ``lr_rule="none"``; the DiveBatch authors ran ``lr_factor=1`` with ``lr_rule``
  ``"none"`` or ``"linear"`` (×2 per doubling).
* :func:`sebs` (Zhao et al. 2020): stage s uses ``b_s = ρ^(s−1)·b_1`` with the
  learning rate held constant (use ``lr_rule="none"``); each stage lasts
  ``stage_epochs`` epochs, so it processes as many examples as the matching stage
  of stagewise SGD (which would divide the lr by ρ instead) with ρ times fewer
  updates per stage than the one before.
* :func:`by_epoch`: a given batch size per epoch (a ramp, or a trajectory another
  run took, replayed without its statistics).

Example::

    >>> from divebatch_jax import policies
    >>> policy = policies.adabatch(factor=2, every=20, max_batch_size=2048)
    >>> policy.needs_stats(0)
    False
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from divebatch_jax.transform.policies import base


class ScheduleState(NamedTuple):
  lr_multiplier: jax.Array


def _never(epoch: int) -> bool:
  del epoch
  return False


def _schedule_init(params) -> ScheduleState:
  del params
  return ScheduleState(jnp.ones((), jnp.float32))


def constant() -> base.BatchSizePolicy:
  """The fixed batch size b0 (plain mini-batch SGD)."""

  def update(info: base.PolicyInfo, state: ScheduleState):
    return base.PolicyDecision(info.batch_size, state.lr_multiplier, jnp.float32(base.NAN)), state

  return base.BatchSizePolicy("constant", _schedule_init, update, _never)


def _multiply_at(
    name: str, growth: float, max_batch_size: int, lr_factor: float, is_boundary, decision_steps: int = 0
) -> base.BatchSizePolicy:
  """b ← min(floor(growth·b), b_max) and m ← lr_factor·m where ``is_boundary(info)``."""

  def update(info: base.PolicyInfo, state: ScheduleState):
    grown = base.grow_towards(
        info.batch_size.astype(jnp.float32) * growth, info.batch_size, max_batch_size
    )
    grows = is_boundary(info) & (grown > info.batch_size)
    new_b = jnp.where(grows, grown, info.batch_size)
    new_m = jnp.where(grows, state.lr_multiplier * lr_factor, state.lr_multiplier)
    requested = jnp.where(grows, info.batch_size.astype(jnp.float32) * growth, jnp.nan)
    return base.PolicyDecision(new_b, new_m, jnp.float32(base.NAN), requested), ScheduleState(new_m)

  return base.BatchSizePolicy(
      name, _schedule_init, update, _never, decision_steps=decision_steps, max_batch_size=max_batch_size
  )


def adabatch(
    factor: float = 2,
    every: int = 20,
    *,
    max_batch_size: int,
    lr_factor: float = 1.0,
    every_steps: int | None = None,
) -> base.BatchSizePolicy:
  """AdaBatch: multiply b by ``factor`` every ``every`` epochs, up to ``max_batch_size``.

  Args:
    factor: growth factor r > 1 (2 in the paper).
    every: epochs between increases (20 on CIFAR).
    max_batch_size: the cap b_max.
    lr_factor: multiplies the policy's lr multiplier at each increase (0.75 is
      the paper's CIFAR setting, 1.0 the DiveBatch authors').
    every_steps: instead of ``every`` epochs, increase after every ``every_steps``-th
      optimizer step (a one-epoch run then still grows).
  """
  factor = base.check_positive_float("factor", factor, minimum=1.0)
  every = base.check_positive_int("every", every)
  max_batch_size = base.check_positive_int("max_batch_size", max_batch_size)
  lr_factor = base.check_positive_float("lr_factor", lr_factor)
  every_steps = base.check_cadence(every_steps)
  return _multiply_at(
      "adabatch", factor, max_batch_size, lr_factor,
      lambda info: base.at_decision_point(info, every, every_steps), every_steps or 0,
  )


def by_epoch(sizes: Sequence[int]) -> base.BatchSizePolicy:
  """Epoch e (0-based) runs at ``sizes[e]`` (the last size from then on).

  The size for epoch e + 1 is set at the end of epoch e; ``sizes[0]`` must equal
  the transformation's ``base_batch_size``.
  """
  sizes = [base.check_positive_int("sizes entry", b) for b in sizes]
  if not sizes:
    raise ValueError("sizes must be a non-empty list of positive ints.")
  table = jnp.asarray(sizes, jnp.int32)

  def update(info: base.PolicyInfo, state: ScheduleState):
    following = table[jnp.minimum(info.epoch + 1, len(sizes) - 1)]
    new_b = jnp.where(info.epoch_end, following, info.batch_size)
    return base.PolicyDecision(new_b, state.lr_multiplier, jnp.float32(base.NAN)), state

  return base.BatchSizePolicy("by_epoch", _schedule_init, update, _never, max_batch_size=max(sizes))


def stage_boundaries(stage_epochs: int | Sequence[int], horizon: int = 10_000) -> np.ndarray:
  """Epoch counts after which a new stage starts (cumulative stage lengths).

  An int repeats the same stage length up to ``horizon`` epochs; a sequence
  gives each stage's length, the last one repeating.
  """
  lengths = [stage_epochs] if isinstance(stage_epochs, int) else list(stage_epochs)
  if not lengths:
    raise ValueError("stage_epochs must be a positive int or a non-empty sequence of them.")
  for length in lengths:
    base.check_positive_int("stage_epochs", length)
  ends, total, i = [], 0, 0
  while total < horizon:
    total += lengths[min(i, len(lengths) - 1)]
    ends.append(total)
    i += 1
  return np.asarray(ends, np.int32)


def sebs(
    rho: float, stage_epochs: int | Sequence[int], max_batch_size: int, *, stage_steps: int | None = None
) -> base.BatchSizePolicy:
  """SEBS: stagewise enlargement, ``b_s = ρ^(s−1)·b_1`` at stage boundaries, lr constant.

  Args:
    rho: enlargement factor ρ > 1 per stage (ρ = 2 is a common choice; the
      paper's defaults were not verified here, so there is no default).
    stage_epochs: epochs per stage, an int or one length per stage (the last
      repeats).
    max_batch_size: the cap.
    stage_steps: instead of ``stage_epochs``, stages of ``stage_steps`` optimizer
      steps each.
  """
  rho = base.check_positive_float("rho", rho, minimum=1.0)
  max_batch_size = base.check_positive_int("max_batch_size", max_batch_size)
  boundaries = jnp.asarray(stage_boundaries(stage_epochs))
  stage_steps = base.check_cadence(stage_steps)
  if stage_steps is not None:
    return _multiply_at(
        "sebs", rho, max_batch_size, 1.0, lambda info: base.every_n_steps(info, stage_steps), stage_steps
    )
  return _multiply_at(
      "sebs",
      rho,
      max_batch_size,
      1.0,
      lambda info: info.epoch_end & jnp.any(boundaries == info.epoch + 1),
  )
