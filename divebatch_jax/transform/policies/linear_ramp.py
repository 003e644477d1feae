"""The linear batch ramp of language-model pretraining (GPT-3, Megatron, MaxText).

Megatron's ``--rampup-batch-size START INCREMENT SAMPLES`` and MaxText's
``rampup_batch_size``: the batch grows from b₀ to b_max in k = ⌈(b_max − b₀)/Δb⌉
equal increments of Δb, one every ⌊N/k⌋ examples of the ramp's N::

    b(s) = min(b₀ + Δb · ⌊s / ⌊N/k⌋⌋, b_max)          s = examples seen

The size is re-evaluated every ``every`` optimizer steps. For a ramp over tokens
pass N = tokens / (tokens per example). No statistics are needed.

Example::

    >>> from divebatch_jax import policies
    >>> ramp = policies.linear_ramp(256, ramp_examples=10_000, increment=32)
    >>> ramp.needs_stats(0), ramp.decision_steps
    (False, 1)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from divebatch_jax.transform.policies import base


class LinearRampState(NamedTuple):
  examples: jax.Array  # int32, examples seen
  lr_multiplier: jax.Array


def _ramp_length(info: base.PolicyInfo, ramp_examples: int | None, ramp_epochs: float | None) -> jax.Array:
  """N, the ramp's examples, as int32 (``ramp_epochs`` epochs of the n examples)."""
  if ramp_examples is not None:
    return jnp.int32(ramp_examples)
  return jnp.maximum(jnp.floor(ramp_epochs * info.num_examples.astype(jnp.float32)), 1).astype(jnp.int32)


def linear_ramp(
    max_batch_size: int,
    *,
    ramp_examples: int | None = None,
    ramp_epochs: float | None = None,
    increment: int | None = None,
    every: int = 1,
) -> base.BatchSizePolicy:
  """b₀ → ``max_batch_size`` over the first N examples, in equal increments.

  Args:
    max_batch_size: b_max, the size at the end of the ramp.
    ramp_examples: N, the examples the ramp spans (or give ``ramp_epochs``).
    ramp_epochs: N as epochs of the data set (N = ramp_epochs · n).
    increment: Δb, examples added per increment (default b₀).
    every: optimizer steps between re-evaluations of the size.
  """
  max_batch_size = base.check_positive_int("max_batch_size", max_batch_size)
  if (ramp_examples is None) == (ramp_epochs is None):
    raise ValueError("linear_ramp needs exactly one of ramp_examples= or ramp_epochs=.")
  if ramp_examples is not None:
    base.check_positive_int("ramp_examples", ramp_examples)
  else:
    base.check_positive_float("ramp_epochs", ramp_epochs)
  if increment is not None:
    base.check_positive_int("increment", increment)
  every = base.check_positive_int("every", every)

  def init(params) -> LinearRampState:
    del params
    return LinearRampState(jnp.zeros((), jnp.int32), jnp.ones((), jnp.float32))

  def update(info: base.PolicyInfo, state: LinearRampState):
    examples = state.examples + info.count
    b0 = info.base_batch_size
    step_size = b0 if increment is None else jnp.int32(increment)
    increments = jnp.maximum((max_batch_size - b0 + step_size - 1) // step_size, 1)
    per_increment = jnp.maximum(_ramp_length(info, ramp_examples, ramp_epochs) // increments, 1)
    ramped = b0 + step_size * (examples // per_increment)
    new_b = jnp.where(base.every_n_steps(info, every), jnp.minimum(ramped, max_batch_size), info.batch_size)
    new_b = jnp.maximum(new_b, info.batch_size).astype(jnp.int32)
    requested = jnp.where(new_b > info.batch_size, ramped.astype(jnp.float32), jnp.nan)
    decision = base.PolicyDecision(new_b, state.lr_multiplier, jnp.float32(base.NAN), requested)
    return decision, LinearRampState(examples, state.lr_multiplier)

  return base.BatchSizePolicy(
      "linear_ramp", init, update, lambda epoch: False, decision_steps=every, max_batch_size=max_batch_size
  )
