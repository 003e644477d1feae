"""Learning-rate rules applied when the batch size changes (docs/algorithms.md).

With ``S = b / b0`` (current over base batch size) the update of the inner
optimizer is multiplied by

* ``"none"``:     1
* ``"linear"``:   S                              (Goyal et al. 2017)
* ``"sqrt"``:     √S                             (often used with Adam)
* ``"adascale"``: r = (σ² + μ²) / (σ²/S + μ²), σ² = tr Σ / b0, μ² = |G|²
  (Johnson et al. 2020), from the smoothed noise components; r lies in [1, S]
  and is 1 until statistics have been seen.

An optional cap bounds the scale from above.

Example::

    >>> import jax.numpy as jnp
    >>> from divebatch_jax.transform import lr_rules, noise_ema
    >>> float(lr_rules.lr_scale("linear", jnp.int32(512), 128, noise_ema.init()))
    4.0
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from divebatch_jax.transform import noise_ema

LR_RULES = ("none", "linear", "sqrt", "adascale")


def check_rule(rule: str) -> str:
  if rule not in LR_RULES:
    raise ValueError(f"lr_rule must be one of {LR_RULES}, got {rule!r}.")
  return rule


def adascale_gain(
    ratio: jax.Array, noise: noise_ema.NoiseEMAState, base_batch_size: jax.Array
) -> jax.Array:
  """AdaScale gain r = (σ² + μ²)/(σ²/S + μ²) with σ² = tr Σ/b0, μ² = |G|², clipped to [1, S]."""
  trace, grad_sq = noise_ema.estimates(noise)
  sigma_sq = jnp.maximum(trace, 0.0) / base_batch_size
  mu_sq = jnp.maximum(grad_sq, 0.0)
  denom = sigma_sq / ratio + mu_sq
  gain = jnp.where(denom > 0, (sigma_sq + mu_sq) / jnp.where(denom > 0, denom, 1.0), 1.0)
  gain = jnp.where(jnp.isfinite(gain), gain, 1.0)
  return jnp.clip(gain, 1.0, jnp.maximum(ratio, 1.0))


def lr_scale(
    rule: str,
    batch_size: jax.Array,
    base_batch_size: jax.Array | int,
    noise: noise_ema.NoiseEMAState,
    max_scale: float | None = None,
) -> jax.Array:
  """The factor the rule applies to updates at ``batch_size`` (float32 scalar)."""
  base = jnp.asarray(base_batch_size, jnp.float32)
  ratio = jnp.asarray(batch_size, jnp.float32) / base
  if rule == "none":
    scale = jnp.ones((), jnp.float32)
  elif rule == "linear":
    scale = ratio
  elif rule == "sqrt":
    scale = jnp.sqrt(ratio)
  elif rule == "adascale":
    scale = adascale_gain(ratio, noise, base)
  else:
    check_rule(rule)
  if max_scale is not None:
    scale = jnp.minimum(scale, max_scale)
  return scale.astype(jnp.float32)
