"""A base learning-rate schedule as its decay d(t) = η(t)/η₀, evaluated on device.

The lr-batch coupling (:mod:`divebatch_jax.transform.coupling`) and Seesaw's batch
schedule (:func:`divebatch_jax.policies.seesaw`) both read the schedule the inner
optimizer follows through this one object: a jnp function of the optimizer step
(an optax schedule) or of the 0-based epoch (schedules a host sets once per
epoch, as the CLI's), and its peak η₀.

Example::

    >>> import jax.numpy as jnp, optax
    >>> from divebatch_jax.transform.schedule_decay import schedule_decay
    >>> decay = schedule_decay(optax.cosine_decay_schedule(0.1, 1000))
    >>> round(float(decay.at(step=jnp.int32(500), epoch=jnp.int32(0))), 4)
    0.5
"""

from __future__ import annotations

import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

SCHEDULE_UNITS = ("step", "epoch")


class ScheduleDecay(NamedTuple):
  """d(t) = schedule(t) / peak, t the optimizer step or the epoch (``per``).

  Attributes:
    schedule: a jnp function of the step count or the 0-based epoch (an optax
      schedule, or the CLI's epoch schedule) giving the base learning rate.
    peak: η₀, the rate the decay is measured from.
    per: ``"step"`` or ``"epoch"``: what ``schedule`` is a function of.
  """

  schedule: Callable[[jax.Array], jax.Array]
  peak: float
  per: str

  def at(self, *, step: jax.Array, epoch: jax.Array) -> jax.Array:
    """d at the given step / epoch, as float32."""
    t = step if self.per == "step" else epoch
    return (jnp.asarray(self.schedule(t), jnp.float32) / self.peak).astype(jnp.float32)


def schedule_decay(schedule: Callable, *, peak: float | None = None, per: str = "step") -> ScheduleDecay:
  """The decay of ``schedule`` relative to ``peak`` (default ``schedule(0)``).

  Pass ``peak`` for a schedule with warmup (its maximum, not its start).
  """
  if per not in SCHEDULE_UNITS:
    raise ValueError(f"per must be one of {SCHEDULE_UNITS}, got {per!r}.")
  if not callable(schedule):
    raise TypeError(f"schedule must be a function of the {per} count, got {type(schedule).__name__}.")
  peak = float(schedule(0)) if peak is None else peak
  if isinstance(peak, bool) or not isinstance(peak, numbers.Real) or not peak > 0:
    raise ValueError(f"peak must be a number > 0 (the schedule's largest rate), got {peak!r}.")
  return ScheduleDecay(schedule, float(peak), per)
