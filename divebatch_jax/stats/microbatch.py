"""Gradient accumulation over micro-batches, weighted by real counts.

A step of ``b`` examples laid out as ``K`` micro-batches of ``m`` rows (leaves
``(K, m, ...)``, mask ``(K, m)``, see :mod:`divebatch_jax.data.buckets`) gives
exactly what one pass over its ``b`` real rows gives:

    loss = Σ_k Σ_{i real in k} ℓ_i / b,      grad = Σ_k Σ_{i real in k} g_i / b

Per-micro-batch *sums* are added and divided once by the total count ``b``, so
micro-batches holding different numbers of real rows are weighted by those
numbers (averaging micro-batch means would not be). The plain path is a
loop (unrolled) of :func:`~divebatch_jax.stats.masked_loss_and_grad` over the ``K``
micro-batches. With ``stats_method`` the step also returns a
:class:`~divebatch_jax.stats.GradientStats` record of the whole step: the
micro-batches are handed to :func:`~divebatch_jax.stats.gradient_stats` as one
batch processed ``chunk_size`` (default ``m``) rows at a time, so ``sum_ip`` is
taken about the step's mean gradient ḡ, not each micro-batch's (the exact method
then makes a second pass over the chunks for it).

Example::

    import jax, jax.numpy as jnp
    from divebatch_jax.stats.microbatch import accumulate_gradients

    def loss_fn(w, batch):
      return 0.5 * (batch["x"] @ w - batch["y"]) ** 2

    batch = {"x": jnp.ones((2, 4, 3)), "y": jnp.zeros((2, 4))}   # K = 2, m = 4
    mask = jnp.array([[True] * 4, [True, True, False, False]])    # 6 real rows
    loss, grad, _ = jax.jit(accumulate_gradients, static_argnums=0)(
        loss_fn, jnp.ones(3), batch, mask)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from divebatch_jax.stats.kernel import (
    GradientStats,
    LossFn,
    PyTree,
    gradient_stats,
    masked_loss_and_grad,
)


def _check_layout(batch: PyTree, mask: jax.Array) -> tuple[int, int]:
  if jnp.ndim(mask) != 2:
    raise ValueError(f"mask must have shape (K, m) (micro-batches, rows), got {jnp.shape(mask)}.")
  k, m = jnp.shape(mask)
  for leaf in jax.tree.leaves(batch):
    if jnp.shape(leaf)[:2] != (k, m):
      raise ValueError(
          f"batch leaves must have leading shape (K, m) = {(k, m)} to match mask, got {jnp.shape(leaf)}."
      )
  return k, m


def accumulate_gradients(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    mask: jax.Array,
    *,
    stats_method: str | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, PyTree, GradientStats | None]:
  """Mean loss and gradient over the real rows of ``K`` micro-batches (jittable).

  Args:
    loss_fn: ``loss_fn(params, micro_batch) -> (m,)`` per-example losses.
    params: parameter pytree.
    batch: pytree with leaves ``(K, m, ...)``.
    mask: bool ``(K, m)``, True on real rows; micro-batches may hold different
      numbers of real rows (or none).
    stats_method: None for the plain gradient; a :func:`gradient_stats` method
      (``"exact"``, ...) to also return the step's statistics record.
    chunk_size: rows per chunk for ``stats_method`` (default ``m``).

  Returns:
    ``(loss, grad, stats)``: the mean loss (float32) and mean gradient (params'
    dtypes) over all real rows -- zeros when there is none -- and a
    :class:`GradientStats` record (None without ``stats_method``).
  """
  k, m = _check_layout(batch, mask)
  mask = jnp.asarray(mask, bool)
  if stats_method is not None:
    flat = jax.tree.map(lambda x: jnp.reshape(x, (k * m,) + jnp.shape(x)[2:]), batch)
    return gradient_stats(
        loss_fn, params, flat, mask.reshape(k * m), method=stats_method,
        chunk_size=m if chunk_size is None else chunk_size,
    )

  # Unrolled over the K micro-batches, not scanned: XLA:CPU runs convolution
  # gradients inside a loop body 10x+ slower than unrolled ones.
  loss_sum = jnp.zeros((), jnp.float32)
  grad_sum = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  count = jnp.zeros((), jnp.int32)
  for i in range(k):
    micro_batch = jax.tree.map(lambda x: x[i], batch)
    micro_loss, micro_grad, micro_count = masked_loss_and_grad(loss_fn, params, micro_batch, mask[i])
    loss_sum = loss_sum + micro_loss.astype(jnp.float32)
    grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, micro_grad)
    count = count + micro_count
  n = jnp.maximum(count, 1).astype(jnp.float32)
  grad = jax.tree.map(lambda g, p: (g / n).astype(jnp.result_type(p)), grad_sum, params)
  return loss_sum / n, grad, None
