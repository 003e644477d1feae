"""Goodput (Pollux, Qiao et al., OSDI 2021): the batch that trains fastest per second.

With the gradient noise scale B_noise (smoothed like :func:`noise_scale`), the
statistical efficiency of a batch of M examples relative to b0 is
``E(M) = (B_noise + b0) / (B_noise + M)`` — the progress per example, which falls
once M passes the noise scale — and the goodput is the measured throughput times
it. Every ``every`` steps with statistics::

    b ← argmax_M  throughput(M) · (B_noise + b0) / (B_noise + M)

(B_noise = +inf, a |G|² estimate at or below zero, makes every M equally efficient:
the fastest layout wins.)

over the batch sizes whose throughput was measured (examples/s per layout, e.g.
what ``divebatch-train`` measured to choose its device batch) and the multiples of
the largest of them up to ``max_batch_size``, which run as that many calls of it
at its rate. Small batches win while the noise scale is small; as training
progresses and B_noise grows, larger batches pay.

Example::

    >>> from divebatch_jax import policies
    >>> policy = policies.goodput({32: 700.0, 64: 760.0, 128: 800.0}, max_batch_size=512)
    >>> policy.needs_stats(0), policy.name
    (True, 'goodput')
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from divebatch_jax.transform.policies import base
from divebatch_jax.transform.policies import noise_scale as noise_scale_lib


def candidates(throughput: Mapping[int, float], max_batch_size: int) -> tuple[list[int], list[float]]:
  """The sizes a goodput decision chooses from and their examples/s (ascending)."""
  measured = sorted((int(b), float(r)) for b, r in throughput.items() if b <= max_batch_size)
  if not measured:
    raise ValueError(
        f"throughput must hold at least one batch size <= max_batch_size={max_batch_size}, got "
        f"{sorted(throughput)}."
    )
  largest, rate = measured[-1]
  sizes = [b for b, _ in measured] + list(range(2 * largest, max_batch_size + 1, largest))
  rates = [r for _, r in measured] + [rate] * (len(sizes) - len(measured))
  return sizes, rates


def goodput(
    throughput: Mapping[int, float],
    *,
    max_batch_size: int,
    every: int = 1,
    ema: float = 0.99,
    allow_decrease: bool = True,
) -> base.BatchSizePolicy:
  """Pollux's goodput rule on measured throughputs.

  Args:
    throughput: examples/s per batch size, measured on the layouts the run uses.
    max_batch_size: b_max.
    every: decide every ``every`` steps (statistics are needed in every epoch).
    ema: β in [0, 1) of the noise-component averages.
    allow_decrease: Pollux moves both ways; False makes the rule monotone.
  """
  max_batch_size = base.check_positive_int("max_batch_size", max_batch_size)
  for size, rate in throughput.items():
    base.check_positive_int("throughput size", size)
    base.check_positive_float("throughput rate", rate)
  sizes, rates = candidates(throughput, max_batch_size)
  size_table = jnp.asarray(sizes, jnp.float32)
  rate_table = jnp.asarray(rates, jnp.float32)

  def target(b_simple: jax.Array, info: base.PolicyInfo) -> jax.Array:
    b_noise = jnp.maximum(b_simple, 0.0)  # +inf: noise dominates, every M equally efficient
    b0 = info.base_batch_size.astype(jnp.float32)
    finite = jnp.isfinite(b_noise)
    safe = jnp.where(finite, b_noise, 0.0)
    efficiency = jnp.where(finite, (safe + b0) / (safe + size_table), 1.0)
    return jnp.where(jnp.isnan(b_simple), jnp.nan, size_table[jnp.argmax(rate_table * efficiency)])

  return noise_scale_lib.noise_driven(
      "goodput", target, ema=ema, max_batch_size=max_batch_size, every=every,
      allow_decrease=allow_decrease, min_batch_size=sizes[0],
  )
