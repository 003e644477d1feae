"""Exponential moving averages of the gradient-noise components tr Σ and |G|².

Ratios of noisy estimates are biased, so the numerator and denominator of the
noise scale are smoothed separately and divided afterwards (McCandlish et al.
2018, docs/algorithms.md). The averages are bias-corrected like Adam's moments::

    m_t = β·m_{t-1} + (1 − β)·x_t,       estimate = m_t / (1 − β^t)

Used by the ``divebatch(estimator="ema")`` and ``noise_scale`` policies and by
the AdaScale learning-rate rule.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from divebatch_jax import stats as stats_lib


class NoiseEMAState(NamedTuple):
  """Smoothed (tr Σ, |G|²) and the bias-correction weight 1 − β^t (0 = no data yet).

  The field names differ from every optax state's (``trace`` is ``optax.TraceState``'s),
  so that ``optax.tree.get(opt_state, "trace")`` finds the inner optimizer's momentum.
  """

  trace_sigma: jax.Array
  grad_sq: jax.Array
  weight: jax.Array


def init() -> NoiseEMAState:
  return NoiseEMAState(*(jnp.zeros((), jnp.float32) for _ in range(3)))


def update(
    state: NoiseEMAState, stats: stats_lib.GradientStats, decay: float | jax.Array
) -> NoiseEMAState:
  """Folds in one record's unbiased (tr Σ, |G|²); records with < 2 examples are skipped."""
  trace, grad_sq = stats_lib.noise_components(stats)
  valid = jnp.isfinite(trace) & jnp.isfinite(grad_sq)
  decay = jnp.asarray(decay, jnp.float32)

  def mix(old, new):
    return jnp.where(valid, decay * old + (1.0 - decay) * jnp.where(valid, new, 0.0), old)

  return NoiseEMAState(
      trace_sigma=mix(state.trace_sigma, trace),
      grad_sq=mix(state.grad_sq, grad_sq),
      weight=jnp.where(valid, decay * state.weight + (1.0 - decay), state.weight),
  )


def estimates(state: NoiseEMAState) -> tuple[jax.Array, jax.Array]:
  """Bias-corrected (tr Σ, |G|²); NaN before the first valid record."""
  has_data = state.weight > 0
  w = jnp.where(has_data, state.weight, 1.0)
  return (
      jnp.where(has_data, state.trace_sigma / w, jnp.nan),
      jnp.where(has_data, state.grad_sq / w, jnp.nan),
  )


def simple_noise_scale(state: NoiseEMAState) -> jax.Array:
  """B_simple = tr Σ / |G|² from the smoothed components (+inf if |G|² ≤ 0, NaN if no data)."""
  trace, grad_sq = estimates(state)
  safe = jnp.where(grad_sq > 0, grad_sq, 1.0)
  return jnp.where(grad_sq > 0, trace / safe, jnp.where(jnp.isnan(grad_sq), jnp.nan, jnp.inf))
