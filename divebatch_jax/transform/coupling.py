"""The lr-batch coupling: a batch-size increase takes the place of the scheduled lr decay.

A base learning-rate schedule η(t) = η₀·d(t) anneals the gradient noise η/B by its
decay d(t) ≤ 1; a growing batch anneals it too, so a rule that grows the batch on top
of the schedule anneals twice. Under :func:`replace_lr_decay` (Smith et al., ICLR 2018,
"Don't decay the learning rate, increase the batch size"; Seesaw, Meterez et al.
2025, for Adam) the batch growth S = b/b₀ so far undoes up to S^p of the decay::

    η_eff(t) = η(t) · min(S^p, 1/d(t)) = η₀ · min(d(t)·S^p, 1)

with p = 1 for SGD (a batch ×r replaces an lr decay by r) and p = 1/2 for Adam
(a batch ×r replaces a decay by √r: where the schedule halves and the batch
doubles, the lr moves by 1/√2). The lr never exceeds the schedule's peak η₀: growth
beyond the decay so far only anneals by the batch. Seesaw
(:func:`divebatch_jax.policies.seesaw`) is this coupling plus its batch schedule
(b = b₀·2^k after the schedule's k-th halving), so with a step schedule that
halves the lr the effective rate is η₀ (SGD) or η₀·2^(−k/2) (Adam), the paper's.

``d(t)`` is a :class:`~divebatch_jax.transform.schedule_decay.ScheduleDecay`: the base schedule over its peak, evaluated on
device per optimizer step (an optax schedule of the step count) or per epoch (the
CLI's schedules, which the host sets once per epoch).

Example::

    >>> import jax.numpy as jnp, optax
    >>> from divebatch_jax.transform import coupling, schedule_decay
    >>> decay = schedule_decay.schedule_decay(optax.exponential_decay(0.1, 100, 0.5))  # halves per 100 steps
    >>> replace = coupling.replace_lr_decay(decay, power=1.0)
    >>> round(float(replace.factor(jnp.float32(2.0), step=jnp.int32(100), epoch=jnp.int32(0))), 4)
    2.0
    >>> round(float(replace.factor(jnp.float32(4.0), step=jnp.int32(100), epoch=jnp.int32(0))), 4)
    2.0
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from divebatch_jax.transform.policies import base as policy_base
from divebatch_jax.transform.schedule_decay import ScheduleDecay

class LRBatchCoupling(NamedTuple):
  """``replace``: the batch growth S = b/b₀ undoes up to S^power of the decay d(t)."""

  decay: ScheduleDecay
  power: float

  def factor(self, ratio: jax.Array, *, step: jax.Array, epoch: jax.Array) -> jax.Array:
    """min(S^power, 1/d(t)) for S = ``ratio`` at the given step / epoch (float32)."""
    d = self.decay.at(step=step, epoch=epoch)
    undo = jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), jnp.inf)
    return jnp.minimum(jnp.asarray(ratio, jnp.float32) ** self.power, undo).astype(jnp.float32)


def replace_lr_decay(decay: ScheduleDecay, *, power: float = 1.0) -> LRBatchCoupling:
  """The coupling under which a batch increase by r replaces a scheduled lr decay by r^power.

  Args:
    decay: the base schedule's decay d(t) (:func:`~divebatch_jax.transform.schedule_decay.schedule_decay`), the same
      schedule the inner optimizer follows.
    power: p, 1 for SGD (Smith et al.), 0.5 for Adam (Seesaw).
  """
  if not isinstance(decay, ScheduleDecay):
    raise TypeError(f"decay must be a ScheduleDecay (see divebatch_jax.transform.schedule_decay), got {type(decay).__name__}.")
  return LRBatchCoupling(decay, policy_base.check_positive_float("power", power))
