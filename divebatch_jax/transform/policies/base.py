"""The protocol every batch-size policy follows.

A policy is a pair of pure functions plus what a training loop needs to know of its
cadence, so that nothing outside the policy restates it:

* ``init(params) -> state``;
* ``update(info, state) -> (PolicyDecision, state)``, called by
  :func:`divebatch_jax.adaptive_batch` after every optimizer step, on device,
  under ``jit``; it must return the batch size to use from the next step on;
* ``needs_stats(epoch) -> bool``: whether the steps of ``epoch`` (0-based) should
  pass per-example statistics (its measurement window). A loop runs the cheap
  plain-gradient step in the other epochs; statistics passed outside the window
  are ignored by the policy, so passing them on every step is safe. It also
  works on a traced int (the policies evaluate it on device);
* ``decision_steps``: 0 when decisions fall only at epoch ends, else N: the batch
  size may change only after every N-th optimizer step (after global steps N, 2N,
  ...; :func:`every_n_steps`), and a loop re-reads it then;
* ``needs_inner_products``: whether the rule reads ``sum_ip`` (the inner-product
  test), which costs a second pass where a step is split into micro-batches;
* ``max_batch_size``: the rule's cap (None for the constant policy).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from divebatch_jax import stats as stats_lib


class PolicyInfo(NamedTuple):
  """What the transformation tells a policy about the step that just ran.

  Attributes:
    stats: this step's statistics record (empty when ``has_stats`` is False).
    has_stats: static Python bool: whether the step passed statistics.
    count: int32, examples this step used.
    step: int32, 0-based index of this step.
    epoch: int32, 0-based epoch this step belonged to.
    epoch_end: bool, whether this step completed ``epoch``.
    batch_size: int32, the batch size in force for this step.
    num_examples: int32, examples per epoch (n).
    base_batch_size: int32, the initial batch size b0.
  """

  stats: stats_lib.GradientStats
  has_stats: bool
  count: jax.Array
  step: jax.Array
  epoch: jax.Array
  epoch_end: jax.Array
  batch_size: jax.Array
  num_examples: jax.Array
  base_batch_size: jax.Array


class PolicyDecision(NamedTuple):
  """A policy's answer after a step.

  Attributes:
    batch_size: int32, the batch size for the next step.
    lr_multiplier: float32, the policy's own cumulative learning-rate factor
      (AdaBatch's ``lr_factor`` per increase; 1 for the others), applied on top of
      the transformation's learning-rate rule.
    statistic: float32, the quantity the policy measured at this step (diversity
      for DiveBatch, the requested batch size for the tests, B_simple for the
      noise scale), NaN when nothing was measured.
    requested: float32, the rule's own batch size before any clamp or rounding
      (e.g. δ·n·Δ̂), NaN where the step decided nothing.
  """

  batch_size: jax.Array
  lr_multiplier: jax.Array
  statistic: jax.Array
  requested: jax.Array | float = float("nan")


class BatchSizePolicy(NamedTuple):
  """A batch-size rule: ``init`` and ``update`` (on device) and its cadence (host)."""

  name: str
  init: Callable[[Any], Any]
  update: Callable[[PolicyInfo, Any], tuple[PolicyDecision, Any]]
  needs_stats: Callable[[int], bool]
  decision_steps: int = 0
  needs_inner_products: bool = False
  max_batch_size: int | None = None


NAN = float("nan")


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  return int(value)


def check_positive_float(name: str, value: Any, *, minimum: float = 0.0, inclusive=False) -> float:
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  ok = ok and (value >= minimum if inclusive else value > minimum)
  if not ok:
    rel = ">=" if inclusive else ">"
    raise ValueError(f"{name} must be a number {rel} {minimum}, got {value!r}.")
  return float(value)


def grow_towards(
    requested: jax.Array,
    batch_size: jax.Array,
    max_batch_size: int,
    *,
    allow_decrease: bool = False,
    min_batch_size: int = 1,
) -> jax.Array:
  """The next batch size for a requested (float) size, as int32.

  ``floor(clip(requested, lower, max_batch_size))`` with ``lower = batch_size``
  (monotone rules) or ``min_batch_size`` (``allow_decrease``). An infinite request
  (gradients that cancel exactly) gives ``max_batch_size`` (the DiveBatch authors'
  rule); a NaN request (non-finite gradients: the run is diverging) keeps
  ``batch_size``.
  """
  lower = jnp.asarray(min_batch_size if allow_decrease else batch_size, jnp.float32)
  finite = jnp.isfinite(requested)
  clipped = jnp.clip(jnp.where(finite, requested, 0.0), lower, float(max_batch_size))
  grown = jnp.floor(clipped).astype(jnp.int32)
  saturated = jnp.where(jnp.isnan(requested), jnp.asarray(batch_size, jnp.int32), jnp.int32(max_batch_size))
  return jnp.where(finite, grown, saturated)


def every_n_steps(info: PolicyInfo, every: int) -> jax.Array:
  """True on every ``every``-th step (0-based steps every−1, 2·every−1, ...): ⌊s/every⌋
  decisions in s steps, the new size in force from the following step."""
  return ((info.step + 1) % every) == 0


def check_cadence(every_steps: Any) -> int | None:
  """``every_steps`` as None (decide at epoch ends) or an int >= 1."""
  return None if every_steps is None else check_positive_int("every_steps", every_steps)


def at_decision_point(info: PolicyInfo, every_epochs: int, every_steps: int | None) -> jax.Array:
  """The decision points of a rule with an epoch cadence that may be given in steps:
  every ``every_steps`` optimizer steps (:func:`every_n_steps`) when it is set,
  else the end of every ``every_epochs``-th epoch (:func:`at_epoch_end_every`)."""
  if every_steps is not None:
    return every_n_steps(info, every_steps)
  return at_epoch_end_every(info, every_epochs)


def at_epoch_end_every(info: PolicyInfo, every: int) -> jax.Array:
  """True on the last step of epochs e with (e + 1) % every == 0."""
  return info.epoch_end & (((info.epoch + 1) % every) == 0)
