"""Batch size from the gradient noise scale (McCandlish et al. 2018).

The smoothed components tr Σ and |G|² (EMA, bias-corrected, divided after
smoothing) give B_simple = tr Σ / |G|²; the target batch is
``scale · (1 + B_simple)``, the batch at which the step's gradient noise equals
``1/scale`` of its signal. Every ``every`` steps with statistics::

    b ← min(max(b, floor(scale·(1 + B_simple))), b_max)     (monotone by default)

Example::

    >>> from divebatch_jax import policies
    >>> policies.noise_scale(scale=1.0, ema=0.99, max_batch_size=2048).needs_stats(3)
    True
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from divebatch_jax.transform import noise_ema
from divebatch_jax.transform.policies import base


def noise_driven(
    name: str,
    target: Callable[[jax.Array, base.PolicyInfo], jax.Array],
    *,
    ema: float,
    max_batch_size: int,
    every: int,
    allow_decrease: bool,
    min_batch_size: int,
) -> base.BatchSizePolicy:
  """A rule on the smoothed simple noise scale: every ``every`` steps with statistics,
  ``b ← target(B_simple, info)``, clamped (monotone unless ``allow_decrease``).

  B_simple comes from EMA-smoothed tr Σ and |G|² (divided after smoothing); the
  decision's ``statistic`` is B_simple. :func:`noise_scale` and
  :func:`~divebatch_jax.policies.goodput` are built on it.
  """
  if not 0.0 <= ema < 1.0:
    raise ValueError(f"ema must be in [0, 1), got {ema!r}.")
  max_batch_size = base.check_positive_int("max_batch_size", max_batch_size)
  every = base.check_positive_int("every", every)
  min_batch_size = base.check_positive_int("min_batch_size", min_batch_size)

  def init(params) -> noise_ema.NoiseEMAState:
    del params
    return noise_ema.init()

  def update(info: base.PolicyInfo, state: noise_ema.NoiseEMAState):
    if info.has_stats:
      state = noise_ema.update(state, info.stats, ema)
    b_simple = noise_ema.simple_noise_scale(state)
    decide = base.every_n_steps(info, every) & (state.weight > 0) & bool(info.has_stats)
    requested = target(b_simple, info)
    grown = base.grow_towards(
        requested, info.batch_size, max_batch_size, allow_decrease=allow_decrease, min_batch_size=min_batch_size
    )
    new_b = jnp.where(decide, grown, info.batch_size)
    statistic = jnp.where(decide, b_simple, jnp.nan).astype(jnp.float32)
    requested = jnp.where(decide, requested, jnp.nan).astype(jnp.float32)
    return base.PolicyDecision(new_b, jnp.ones((), jnp.float32), statistic, requested), state

  return base.BatchSizePolicy(
      name, init, update, lambda epoch: True, decision_steps=every, max_batch_size=max_batch_size
  )


def noise_scale(
    scale: float = 1.0,
    ema: float = 0.99,
    *,
    max_batch_size: int,
    every: int = 1,
    allow_decrease: bool = False,
    min_batch_size: int = 1,
) -> base.BatchSizePolicy:
  """Target ``scale·(1 + B_simple)`` from EMA-smoothed noise components.

  Args:
    scale: multiplies the critical batch 1 + B_simple.
    ema: β in [0, 1) of the moving averages.
    max_batch_size: b_max.
    every: decide every ``every`` steps.
    allow_decrease: allow shrinking (down to ``min_batch_size``).
    min_batch_size: lower clamp with ``allow_decrease``.
  """
  scale = base.check_positive_float("scale", scale)
  return noise_driven(
      "noise_scale", lambda b_simple, info: scale * (1.0 + b_simple), ema=ema,
      max_batch_size=max_batch_size, every=every, allow_decrease=allow_decrease,
      min_batch_size=min_batch_size,
  )
