"""Statistics records and the quantities the batch-size rules read from them.

For a loss ``loss_fn(params, batch) -> (B,)`` of per-example losses and a mask of
real rows, :func:`gradient_stats` returns the mean loss, the mean gradient and a
:class:`GradientStats` record of sums over the real rows ``i``::

    count  = |{i : mask_i}|
    sum_g  = Σ_i g_i                 (shaped like params, float32)
    sum_sq = Σ_i ||g_i||²
    sum_ip = Σ_i <g_i, ḡ>²           (ḡ = sum_g / count of this call)

Records of different calls combine by :func:`combine_stats` (``count``, ``sum_g``
and ``sum_sq`` add exactly), so an epoch's statistics over batches of any sizes
equal one pass over all of its examples. The rules read them through pure
helpers: :func:`diversity` (Yin et al. 2018), :func:`norm_test_variance` and the
inner-product / orthogonality variances (Byrd et al. 2012, Bollapragada et al.
2018), and :func:`noise_scale` (McCandlish et al. 2018).

Example (at ``w = 0`` the per-example gradients are ``g_i = −y_i x_i``: here ``−x_i``)::

    >>> import jax.numpy as jnp
    >>> import divebatch_jax as dbj
    >>> def loss_fn(w, batch):                       # per-example squared error, (B,)
    ...   return 0.5 * (batch["x"] @ w - batch["y"]) ** 2
    >>> batch = {"x": jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), "y": jnp.ones(3)}
    >>> loss, grad, stats = dbj.gradient_stats(loss_fn, jnp.zeros(2), batch)
    >>> int(stats.count), stats.sum_g.tolist(), float(stats.sum_sq)   # Σ||g_i||² = 1 + 1 + 2
    (3, [-2.0, -2.0], 4.0)
    >>> float(dbj.diversity(stats))                  # Σ||g_i||² / ||Σ g_i||² = 4 / 8
    0.5
    >>> masks = jnp.array([True, False, False]), jnp.array([False, True, True])
    >>> split = [dbj.gradient_stats(loss_fn, jnp.zeros(2), batch, mask)[2] for mask in masks]
    >>> float(dbj.diversity(dbj.combine_stats(*split)))   # two calls combine to the one pass
    0.5
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


PyTree = Any


class GradientStats(NamedTuple):
  """Sums of per-example gradient quantities over the real rows of one or more batches.

  Attributes:
    count: int32 scalar, number of real (unpadded) examples.
    sum_g: Σ_i g_i, a float32 pytree shaped like the parameters.
    sum_sq: float32 scalar, Σ_i ||g_i||².
    sum_ip: float32 scalar, Σ_i <g_i, ḡ>² with ḡ the mean gradient of the call
      that produced the record. After :func:`combine_stats` it is the sum of the
      records' values, each relative to its own mean (see docs/sharp_edges.md).
  """

  count: jax.Array
  sum_g: PyTree
  sum_sq: jax.Array
  sum_ip: jax.Array


def empty_stats(params: PyTree) -> GradientStats:
  """The zero record for ``params``: the identity of :func:`combine_stats`."""
  return GradientStats(
      count=jnp.zeros((), jnp.int32),
      sum_g=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
      sum_sq=jnp.zeros((), jnp.float32),
      sum_ip=jnp.zeros((), jnp.float32),
  )


def combine_stats(*records: GradientStats) -> GradientStats:
  """Adds records field by field (pure; jittable)."""
  if not records:
    raise ValueError("combine_stats needs at least one GradientStats record.")
  return jax.tree.map(lambda *xs: sum(xs[1:], start=xs[0]), *records)


def _tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x, y), a, b))
  return sum(leaves, start=jnp.zeros((), jnp.float32)).real.astype(jnp.float32)


def tree_sq_norm(tree: PyTree) -> jax.Array:
  """||tree||² accumulated in float32."""
  return _tree_vdot(
      jax.tree.map(lambda x: x.astype(jnp.float32), tree),
      jax.tree.map(lambda x: x.astype(jnp.float32), tree),
  )


def safe_count(stats: GradientStats) -> jax.Array:
  """max(count, 1) as float32: the divisor of every mean (of a record or a StepSums)."""
  return jnp.maximum(stats.count, 1).astype(jnp.float32)


def mean_gradient(stats: GradientStats) -> PyTree:
  """ḡ = sum_g / count (zeros when the record is empty); also of a StepSums."""
  n = safe_count(stats)
  return jax.tree.map(lambda s: s / n, stats.sum_g)


def diversity(stats: GradientStats) -> jax.Array:
  """Gradient diversity Δ = Σ_i ||g_i||² / ||Σ_i g_i||² (Yin et al. 2018).

  ``+inf`` where ``||Σ_i g_i||² == 0`` with finite inputs (gradients that cancel
  exactly, an empty record, or all-zero gradients); NaN only where the record
  itself is not finite (NaN or inf gradients: a diverging run), so the two are
  told apart. Over a whole data set of n examples at one point,
  ``n · Δ = 1 + B_simple`` (docs/algorithms.md).
  """
  denom = tree_sq_norm(stats.sum_g)
  finite = jnp.isfinite(denom) & jnp.isfinite(stats.sum_sq)
  safe = jnp.where(denom > 0, denom, 1.0)
  return jnp.where(finite, jnp.where(denom > 0, stats.sum_sq / safe, jnp.inf), jnp.nan)


def _variance_or_nan(numerator: jax.Array, count: jax.Array) -> jax.Array:
  b = count.astype(jnp.float32)
  return jnp.where(count >= 2, numerator / jnp.maximum(b - 1.0, 1.0), jnp.nan)


def norm_test_variance(stats: GradientStats) -> jax.Array:
  """Var₁ = (Σ||g_i||² − B·||ḡ||²) / (B − 1), the norm test's sample variance.

  NaN when fewer than two examples were seen (the variance is undefined).
  """
  b = stats.count.astype(jnp.float32)
  gbar_sq = tree_sq_norm(mean_gradient(stats))
  return _variance_or_nan(stats.sum_sq - b * gbar_sq, stats.count)


def inner_product_variance(stats: GradientStats) -> jax.Array:
  """Var_ip = Σ_i (<g_i, ḡ> − ||ḡ||²)² / (B − 1) = (sum_ip − B·||ḡ||⁴) / (B − 1).

  Uses Σ_i <g_i, ḡ> = B·||ḡ||². NaN when fewer than two examples were seen.
  """
  b = stats.count.astype(jnp.float32)
  gbar_sq = tree_sq_norm(mean_gradient(stats))
  return _variance_or_nan(stats.sum_ip - b * gbar_sq**2, stats.count)


def orthogonality_variance(stats: GradientStats) -> jax.Array:
  """Var_o = Σ_i (||g_i||² − <g_i, ḡ>²/||ḡ||²) / (B − 1) = (sum_sq − sum_ip/||ḡ||²)/(B − 1).

  NaN when fewer than two examples were seen or ḡ = 0.
  """
  gbar_sq = tree_sq_norm(mean_gradient(stats))
  safe = jnp.where(gbar_sq > 0, gbar_sq, jnp.nan)
  return _variance_or_nan(stats.sum_sq - stats.sum_ip / safe, stats.count)


def noise_components(stats: GradientStats) -> tuple[jax.Array, jax.Array]:
  """Unbiased estimates ``(tr Σ, |G|²)`` from per-example sums of B examples.

      tr Σ ≈ (sum_sq/B − ||ḡ||²) · B/(B − 1),     |G|² ≈ ||ḡ||² − tr Σ / B

  Both NaN when fewer than two examples were seen.
  """
  b = stats.count.astype(jnp.float32)
  gbar_sq = tree_sq_norm(mean_gradient(stats))
  trace = _variance_or_nan(stats.sum_sq - b * gbar_sq, stats.count)
  return trace, gbar_sq - trace / jnp.maximum(b, 1.0)


def noise_scale(stats: GradientStats) -> jax.Array:
  """The simple gradient noise scale B_simple = tr Σ / |G|² (McCandlish et al. 2018).

  ``+inf`` where the estimate of |G|² is not positive; NaN with fewer than two
  examples. For smoothed estimates average the two components separately and
  divide afterwards (:mod:`divebatch_jax.policies` does so).
  """
  trace, grad_sq = noise_components(stats)
  safe = jnp.where(grad_sq > 0, grad_sq, 1.0)
  return jnp.where(grad_sq > 0, trace / safe, jnp.where(jnp.isnan(trace), jnp.nan, jnp.inf))


