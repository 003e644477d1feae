"""DiveBatch (Chen, Wang, Sundaram 2025): batch size from gradient diversity.

Every ``resize_every`` epochs, at the end of an instrumented epoch (the last of
each period), with Δ̂ the gradient diversity measured over that epoch::

    b_new = floor(min(max(δ · n · Δ̂, b), b_max))       # never decreases
    b_new = b_max                                      # if Δ̂ = +inf (Σ g_i = 0)
    b_new = b                                          # if Δ̂ is NaN (non-finite gradients)

Statistics passed in other epochs (outside the measurement window) are ignored,
so a loop may pass ``stats=`` on every step.

With ``resize_every_steps=N`` (a language model that sees one epoch) the rule
resizes after every N-th optimizer step instead, from the m examples of the N
steps since the last resize (every step instrumented): ``b_new = floor(min(max(δ·m·Δ̂,
b), b_max))``, m taking n's place (for an epoch m = n; m·Δ̂ ≈ (1 + B_simple)/(1 +
B_simple/m)).

``estimator="epoch"`` is the authors' estimator: ``sum_g`` and ``sum_sq`` summed
over every example of the instrumented epoch, each gradient taken at the weights
in force when the example was used, Δ̂ = Σ||g_i||² / ||Σ g_i||² (per-example sums,
so batches of different sizes weigh examples equally; the published code summed
batch means). ``estimator="ema"`` instead smooths the per-batch noise components
tr Σ and |G|² (at fixed weights within each batch) and uses
``n·Δ̂ = 1 + tr Σ / |G|²`` (docs/algorithms.md), which does not mix weights of
different steps.

Picking δ: the rule asks for ``δ·n·Δ̂ ≈ δ·(1 + B_simple)``, which depends on the
data-set size. With n = 50,000 and Δ̂ ≈ 2 the published δ = 0.1 asks for 10,000
at the first resize, i.e. saturates at b_max at once. Choose δ from the first
resize you want: ``δ = b_target / (n · Δ̂_0)`` with Δ̂_0 from one instrumented
epoch (:func:`suggest_delta`; docs/choosing_delta.md), or let the policy do it:
``divebatch(None, ..., first_resize=b_target)`` sets δ that way at its first
resize, from the Δ̂ measured then, and keeps it.

Example::

    >>> from divebatch_jax import policies
    >>> policy = policies.divebatch(delta=0.01, max_batch_size=2048, resize_every=5)
    >>> [e for e in range(10) if policy.needs_stats(e)]
    [4, 9]
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from divebatch_jax.transform import noise_ema
from divebatch_jax import stats as stats_lib
from divebatch_jax.transform.policies import base

ESTIMATORS = ("epoch", "ema")


def suggest_delta(target_batch_size: float, num_examples: int, diversity: float) -> float:
  """δ that makes the first resize ask for ``target_batch_size``: δ = b_target / (n·Δ̂).

  ``diversity`` is Δ̂ measured over one instrumented epoch (e.g. the first
  record's ``divebatch_jax.diversity``). Example: n = 50,000, Δ̂ = 2, target 512
  gives δ = 0.00512.
  """
  base.check_positive_float("target_batch_size", target_batch_size)
  base.check_positive_int("num_examples", num_examples)
  base.check_positive_float("diversity", diversity)
  if not math.isfinite(diversity) or not math.isfinite(target_batch_size):
    raise ValueError(
        f"diversity and target_batch_size must be finite (a diversity of +inf means the "
        f"gradients cancelled: measure again), got diversity={diversity!r}, "
        f"target_batch_size={target_batch_size!r}."
    )
  return float(target_batch_size) / (num_examples * float(diversity))


class EpochSums(NamedTuple):
  """A :class:`~divebatch_jax.GradientStats` record as the optimizer state holds it: the
  same sums, with ``count`` named ``examples`` so that ``optax.tree.get(opt_state,
  "count")`` finds the inner optimizer's step count, not ours."""

  examples: jax.Array
  sum_g: Any
  sum_sq: jax.Array
  sum_ip: jax.Array

  @classmethod
  def of(cls, record: stats_lib.GradientStats) -> "EpochSums":
    return cls(*record)

  def record(self) -> stats_lib.GradientStats:
    return stats_lib.GradientStats(*self)


class DiveBatchState(NamedTuple):
  """Statistics accumulated over the current instrumented epoch, smoothed noise, and δ
  (NaN until the first resize sets it, with ``first_resize``)."""

  epoch_stats: EpochSums
  noise: noise_ema.NoiseEMAState
  delta: jax.Array


def _checked_delta(delta, first_resize) -> tuple[float | None, int | None]:
  """``(delta, first_resize)`` checked: exactly one given, δ a finite number > 0."""
  if (delta is None) == (first_resize is None):
    raise ValueError(
        f"give exactly one of delta (a number > 0) and first_resize (an int >= 1), got "
        f"delta={delta!r}, first_resize={first_resize!r}."
    )
  if first_resize is not None:
    return None, base.check_positive_int("first_resize", first_resize)
  delta = base.check_positive_float("delta", delta)
  if not math.isfinite(delta):
    raise ValueError(f"delta must be a finite number > 0, got {delta!r}.")
  return delta, None


def _diversity(state: DiveBatchState, info: base.PolicyInfo, estimator: str, *, by_steps: bool):
  """``(Δ̂, the examples it speaks for, whether it was measured)``: the window is n for an
  epoch's measurement, the period's examples for a cadence in steps."""
  n = info.num_examples.astype(jnp.float32)
  if estimator == "epoch":
    window = state.epoch_stats.examples.astype(jnp.float32) if by_steps else n
    return stats_lib.diversity(state.epoch_stats.record()), window, state.epoch_stats.examples > 0
  return (1.0 + noise_ema.simple_noise_scale(state.noise)) / n, n, state.noise.weight > 0


def _delta_and_request(delta, div, window, resize, first_resize):
  """``(δ, δ·window·Δ̂)``; with ``first_resize`` δ is set at the first resize with a usable Δ̂
  so that it asks for exactly ``first_resize``, and kept."""
  requested = delta * window * div
  if first_resize is None:
    return delta, requested
  calibrate = resize & jnp.isnan(delta) & jnp.isfinite(div) & (div > 0)
  delta = jnp.where(calibrate, first_resize / (window * jnp.where(div > 0, div, 1.0)), delta)
  # exactly first_resize: δ·n·Δ̂ in float32 can land just below it and floor one lower
  return delta, jnp.where(calibrate, jnp.float32(first_resize), delta * window * div)


def divebatch(
    delta: float | None,
    max_batch_size: int,
    resize_every: int = 20,
    allow_decrease: bool = False,
    estimator: str = "epoch",
    *,
    min_batch_size: int = 1,
    ema_decay: float = 0.9,
    first_resize: int | None = None,
    resize_every_steps: int | None = None,
) -> base.BatchSizePolicy:
  """The DiveBatch rule.

  Args:
    delta: δ > 0, the fraction of the diversity bound δ·n·Δ̂ to use; None with
      ``first_resize``.
    max_batch_size: b_max.
    resize_every: epochs between resizes; the last epoch of each period is
      instrumented (``needs_stats``).
    allow_decrease: if True the lower clamp is ``min_batch_size`` instead of b.
    estimator: ``"epoch"`` (authors') or ``"ema"`` (noise components smoothed
      over the instrumented epoch's batches).
    min_batch_size: lower clamp with ``allow_decrease``.
    ema_decay: β of the ``"ema"`` estimator.
    first_resize: instead of δ, the batch size the first resize asks for: δ is
      set then to ``first_resize / (n·Δ̂)`` from the Δ̂ measured, and kept.
    resize_every_steps: instead of every ``resize_every`` epochs, resize after every
      ``resize_every_steps``-th optimizer step, with Δ̂ over the examples of the
      period's steps (every step is instrumented).
  """
  delta, first_resize = _checked_delta(delta, first_resize)
  max_batch_size = base.check_positive_int("max_batch_size", max_batch_size)
  resize_every = base.check_positive_int("resize_every", resize_every)
  min_batch_size = base.check_positive_int("min_batch_size", min_batch_size)
  if min_batch_size > max_batch_size:
    raise ValueError(
        f"min_batch_size ({min_batch_size}) must be <= max_batch_size ({max_batch_size})."
    )
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}.")
  resize_every_steps = base.check_cadence(resize_every_steps)

  def needs_stats(epoch: int) -> bool:
    return resize_every_steps is not None or (epoch + 1) % resize_every == 0

  def init(params: Any) -> DiveBatchState:
    start = jnp.float32(jnp.nan if delta is None else delta)
    return DiveBatchState(EpochSums.of(stats_lib.empty_stats(params)), noise_ema.init(), start)

  def update(info: base.PolicyInfo, state: DiveBatchState):
    if info.has_stats:
      measured_state = DiveBatchState(
          EpochSums.of(stats_lib.combine_stats(state.epoch_stats.record(), info.stats)),
          noise_ema.update(state.noise, info.stats, ema_decay),
          state.delta,
      )
      in_window = needs_stats(info.epoch)
      state = jax.tree.map(lambda new, old: jnp.where(in_window, new, old), measured_state, state)
    div, window, measured = _diversity(state, info, estimator, by_steps=resize_every_steps is not None)
    period_end = base.at_decision_point(info, resize_every, resize_every_steps)
    resize = period_end & measured
    current_delta, requested = _delta_and_request(state.delta, div, window, resize, first_resize)
    new_b = jnp.where(
        resize,
        base.grow_towards(
            requested,
            info.batch_size,
            max_batch_size,
            allow_decrease=allow_decrease,
            min_batch_size=min_batch_size,
        ),
        info.batch_size,
    )
    statistic = jnp.where(resize, div, jnp.nan).astype(jnp.float32)
    requested = jnp.where(resize, requested, jnp.nan).astype(jnp.float32)
    fresh = DiveBatchState(*jax.tree.map(jnp.zeros_like, (state.epoch_stats, state.noise)), current_delta)
    state = DiveBatchState(*jax.tree.map(
        lambda new, old: jnp.where(period_end, new, old),
        fresh,
        state._replace(delta=current_delta),
    ))
    return base.PolicyDecision(new_b, jnp.ones((), jnp.float32), statistic, requested), state

  return base.BatchSizePolicy(
      "divebatch", init, update, needs_stats, decision_steps=resize_every_steps or 0,
      max_batch_size=max_batch_size,
  )
