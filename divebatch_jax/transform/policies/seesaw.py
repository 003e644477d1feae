"""Seesaw (Meterez et al., 2025): the batch doubles wherever the base schedule halves the lr.

With the base schedule's decay d(t) = η(t)/η₀ (a
:class:`~divebatch_jax.transform.schedule_decay.ScheduleDecay`) and factor α
(2 in the paper), after the schedule's k-th α-fold decay the batch is::

    b(t) = min(b₀ · α^k, b_max)          k = ⌊log_α(1/d(t))⌋

evaluated for the next step (per optimizer step, or at each epoch end for an
epoch schedule). The learning rate is Seesaw's through the lr-batch coupling of
:mod:`divebatch_jax.transform.coupling` (one formula, ``adaptive_batch(...,
lr_batch_coupling=replace_lr_decay(decay, power=p))``): η_eff = η₀·min(d·S^p, 1)
with S = b/b₀, i.e. with a step schedule that divides the lr by α the rate stays
η₀ under SGD (p = 1) and moves by 1/√α per increase under Adam (p = 1/2); between
the points of a continuous schedule (cosine) it follows d·S^p. Without the
coupling the policy is only the batch schedule, on top of the schedule's decay.

Example::

    >>> import optax
    >>> from divebatch_jax import policies
    >>> from divebatch_jax.transform.schedule_decay import schedule_decay
    >>> decay = schedule_decay(optax.exponential_decay(0.1, 100, 0.5, staircase=True))
    >>> policies.seesaw(decay, max_batch_size=1024).decision_steps
    1
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from divebatch_jax.transform.policies import base
from divebatch_jax.transform.schedule_decay import ScheduleDecay

_LOG_TOLERANCE = 1e-4  # float32 log of an exact power of α lands a hair below k


class SeesawState(NamedTuple):
  lr_multiplier: jax.Array


def halvings(decay: jax.Array, factor: float) -> jax.Array:
  """k = ⌊log_factor(1/d)⌋ (float32; +inf where d ≤ 0, negative where d > 1)."""
  d = jnp.asarray(decay, jnp.float32)
  safe = jnp.where(d > 0, d, 1.0)
  k = jnp.floor(-jnp.log(safe) / math.log(factor) + _LOG_TOLERANCE)
  return jnp.where(d > 0, k, jnp.inf)


def seesaw(decay: ScheduleDecay, *, max_batch_size: int, factor: float = 2.0, every: int = 1) -> base.BatchSizePolicy:
  """The batch ×``factor`` at each ``factor``-fold decay of the base schedule ``decay``.

  Args:
    decay: the base schedule's decay d(t), per step or per epoch.
    max_batch_size: b_max.
    factor: α > 1, the decay per batch increase (2: each halving of the lr).
    every: steps between evaluations for a per-step schedule (a per-epoch one is
      evaluated at epoch ends).
  """
  if not isinstance(decay, ScheduleDecay):
    raise TypeError(f"decay must be a ScheduleDecay (divebatch_jax.transform.schedule_decay), got {type(decay).__name__}.")
  max_batch_size = base.check_positive_int("max_batch_size", max_batch_size)
  factor = base.check_positive_float("factor", factor, minimum=1.0)
  every = base.check_positive_int("every", every)
  per_step = decay.per == "step"

  def update(info: base.PolicyInfo, state: SeesawState):
    next_epoch = info.epoch + info.epoch_end.astype(jnp.int32)
    k = halvings(decay.at(step=info.step + 1, epoch=next_epoch), factor)
    requested = info.base_batch_size.astype(jnp.float32) * jnp.power(jnp.float32(factor), k)
    decides = base.every_n_steps(info, every) if per_step else info.epoch_end
    grown = base.grow_towards(requested, info.batch_size, max_batch_size)
    new_b = jnp.where(decides, grown, info.batch_size)
    noted = jnp.where(new_b > info.batch_size, requested, jnp.nan)
    return base.PolicyDecision(new_b, state.lr_multiplier, jnp.float32(base.NAN), noted), state

  return base.BatchSizePolicy(
      "seesaw", lambda params: SeesawState(jnp.ones((), jnp.float32)), update, lambda epoch: False,
      decision_steps=every if per_step else 0, max_batch_size=max_batch_size,
  )
