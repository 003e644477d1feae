"""Batch-size warmup that follows the critical batch size (Merrill et al., 2025).

Merrill et al. ("Critical Batch Size Revisited", OLMo 1B) measure the critical
batch size B*(t) along a run (:mod:`divebatch_jax.train.cbs`): near 0 at
initialisation, rising fast, then flat; and train with a batch that starts small
and doubles each time B*(t) passes it. With ``cbs(x)`` the critical batch size
after x examples (measured points interpolated, or a fit), b₀ the initial batch::

    b(x) = min(b₀ · 2^k, b_max)      k = max(⌊log₂(cbs(x) / b₀)⌋, 0)

re-evaluated every ``every`` optimizer steps, never decreasing. ``lr_power`` p
multiplies the learning rate by (b/b₀)^p (0: the schedule alone; 1/2: Seesaw's
√ under Adam, 1: its SGD form).

The same rule, given ``cbs(x) = b₀ / d(x)`` with d the decay of a schedule over
examples, is Seesaw on that schedule (:func:`seesaw_over_examples`).

Example (measured: 8 at 0 examples, 64 at 1,000; b₀ = 8)::

    >>> from divebatch_jax import policies
    >>> policy = policies.cbs_warmup(([0, 1000], [8, 64]), max_batch_size=256)
    >>> policy.name, policy.decision_steps, policy.needs_stats(0)
    ('cbs_warmup', 1, False)
    >>> [int(batch_for(x, measured_cbs([0, 1000], [8, 64]), 8, 256)) for x in (0, 100, 500, 999, 1000)]
    [8, 8, 32, 32, 64]
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from divebatch_jax.transform.policies import base

CBSCurve = Callable[[jax.Array], jax.Array]  # examples seen (float32) -> critical batch size


class CBSWarmupState(NamedTuple):
  examples: jax.Array  # float32, examples seen
  lr_multiplier: jax.Array


def measured_cbs(examples: Sequence[float], cbs: Sequence[float]) -> CBSCurve:
  """The measured points, linearly interpolated (flat beyond both ends)."""
  xs, ys = np.asarray(examples, np.float64), np.asarray(cbs, np.float64)
  if xs.ndim != 1 or xs.shape != ys.shape or xs.size == 0:
    raise ValueError(f"examples and cbs must be equal-length non-empty sequences, got {xs.shape} and {ys.shape}.")
  if np.any(np.diff(xs) <= 0):
    raise ValueError(f"examples must be strictly increasing, got {xs.tolist()}.")
  xs32, ys32 = jnp.asarray(xs, jnp.float32), jnp.asarray(ys, jnp.float32)
  return lambda x: jnp.interp(jnp.asarray(x, jnp.float32), xs32, ys32)


def fit_cbs(examples: Sequence[float], cbs: Sequence[float]) -> tuple[float, float]:
  """(a, p) of the least-squares power law cbs ≈ a · x^p over the points with x > 0 and
  cbs > 0 (in log space); needs two such points."""
  xs, ys = np.asarray(examples, np.float64), np.asarray(cbs, np.float64)
  keep = (xs > 0) & (ys > 0)
  if keep.sum() < 2:
    raise ValueError(f"fit_cbs needs two points with examples > 0 and cbs > 0, got {keep.sum()}.")
  p, log_a = np.polyfit(np.log(xs[keep]), np.log(ys[keep]), 1)
  return float(math.exp(log_a)), float(p)


def fitted_cbs(examples: Sequence[float], cbs: Sequence[float]) -> CBSCurve:
  """:func:`fit_cbs`'s power law as a curve (capped at the largest measured value, as
  the measured critical batch size flattens)."""
  a, p = fit_cbs(examples, cbs)
  cap = float(np.max(cbs))
  return lambda x: jnp.minimum(a * jnp.power(jnp.maximum(jnp.asarray(x, jnp.float32), 1.0), p), cap)


def batch_for(examples, curve: CBSCurve, base_batch_size, max_batch_size: int) -> jax.Array:
  """b(x) of the module docstring (int32), before the never-decrease clamp."""
  b0 = jnp.asarray(base_batch_size, jnp.float32)
  ratio = jnp.maximum(curve(examples) / b0, 1.0)
  k = jnp.floor(jnp.log2(ratio) + 1e-6)
  return jnp.minimum(b0 * jnp.exp2(k), float(max_batch_size)).astype(jnp.int32)


Curve = Union[CBSCurve, tuple[Sequence[float], Sequence[float]]]


def cbs_warmup(cbs: Curve, *, max_batch_size: int, every: int = 1, lr_power: float = 0.0,
               run_epochs: float | None = None) -> base.BatchSizePolicy:
  """The batch doubles each time the critical batch size passes it.

  Args:
    cbs: the critical batch size against examples seen: a callable (traceable,
      e.g. :func:`fitted_cbs`) or ``(examples, values)``, interpolated
      (:func:`measured_cbs`).
    max_batch_size: b_max.
    every: optimizer steps between re-evaluations.
    lr_power: p, the learning rate × (b/b₀)^p.
    run_epochs: when given, ``cbs`` is read at the fraction of the run done,
      x / (run_epochs · n), instead of at x examples (n: examples per epoch).
  """
  max_batch_size = base.check_positive_int("max_batch_size", max_batch_size)
  every = base.check_positive_int("every", every)
  lr_power = base.check_positive_float("lr_power", lr_power, inclusive=True)
  curve = cbs if callable(cbs) else measured_cbs(*cbs)
  if run_epochs is not None:
    run_epochs = base.check_positive_float("run_epochs", run_epochs)

  def init(params) -> CBSWarmupState:
    del params
    return CBSWarmupState(jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32))

  def update(info: base.PolicyInfo, state: CBSWarmupState):
    examples = state.examples + info.count.astype(jnp.float32)
    x = examples if run_epochs is None else examples / (run_epochs * info.num_examples.astype(jnp.float32))
    wanted = batch_for(x, curve, info.base_batch_size, max_batch_size)
    new_b = jnp.where(base.every_n_steps(info, every), jnp.maximum(wanted, info.batch_size), info.batch_size)
    new_b = new_b.astype(jnp.int32)
    scale = jnp.power(new_b.astype(jnp.float32) / info.base_batch_size.astype(jnp.float32), lr_power)
    requested = jnp.where(new_b > info.batch_size, curve(x), jnp.nan)
    decision = base.PolicyDecision(new_b, scale, jnp.float32(base.NAN), requested)
    return decision, CBSWarmupState(examples, scale)

  return base.BatchSizePolicy(
      "cbs_warmup", init, update, lambda epoch: False, decision_steps=every, max_batch_size=max_batch_size
  )


def seesaw_over_examples(epochs: float, base_batch_size: int, *, max_batch_size: int,
                         lr_power: float = 0.5, every: int = 1) -> base.BatchSizePolicy:
  """Seesaw on the cosine over the run's ``epochs`` · n examples (the schedule the
  language-model runs use): the batch doubles at each halving of
  d(f) = ½(1 + cos(π f)), f the fraction of the run's examples seen, the learning rate
  × (b/b₀)^``lr_power`` (1/2 under Adam, Seesaw's √ per doubling; 1 under SGD). The
  cosine itself stays the run's schedule: η = η₀ · d · (b/b₀)^p."""
  b0 = float(base.check_positive_int("base_batch_size", base_batch_size))

  def curve(fraction):
    d = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(jnp.asarray(fraction, jnp.float32), 1.0)))
    return b0 / jnp.maximum(d, 1e-12)

  policy = cbs_warmup(curve, max_batch_size=max_batch_size, every=every, lr_power=lr_power, run_epochs=epochs)
  return policy._replace(name="seesaw_over_examples")
