"""The statistics kernel: ``gradient_stats`` and its methods over one batch with a mask.

``gradient_stats(loss_fn, params, batch, mask, method=...)`` returns the mean
loss, the mean gradient and a :class:`~divebatch_jax.stats.records.GradientStats`
record over the real rows. The methods: ``"exact"`` (vmap of per-example
gradients), ``"ghost"`` (per-layer taps, :mod:`divebatch_jax.stats.taps`),
``"microbatch"`` (the micro-batch estimator) and ``"auto"``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from divebatch_jax.stats import taps
from divebatch_jax.stats.records import GradientStats, empty_stats, safe_count, tree_sq_norm

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

METHODS = ("exact", "ghost", "microbatch", "auto")


# --------------------------------------------------------------------------- kernel


def batch_size_of(batch: PyTree) -> int:
  """The leading (batch) dimension shared by every leaf of ``batch``."""
  sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(f"batch leaves must share one leading dimension, got sizes {sorted(sizes)}.")
  return sizes.pop()


def resolve_mask(batch: PyTree, mask: jax.Array | None) -> jax.Array:
  """``mask`` as a bool (B,) array; all rows real when ``mask`` is None."""
  b = batch_size_of(batch)
  if mask is None:
    return jnp.ones((b,), bool)
  mask = jnp.asarray(mask)
  if mask.shape != (b,):
    raise ValueError(f"mask must have shape ({b},) to match the batch, got {mask.shape}.")
  return mask.astype(bool)


def masked_loss_and_grad(
    loss_fn: LossFn, params: PyTree, batch: PyTree, mask: jax.Array | None = None
) -> tuple[jax.Array, PyTree, jax.Array]:
  """Plain (non per-example) step: ``(Σ loss, Σ grad, count)`` over real rows.

  Sums rather than means so that batches of different real counts combine by
  addition; divide once by the total count.
  """
  mask = resolve_mask(batch, mask)

  def summed(p):
    losses = loss_fn(p, batch)
    return jnp.sum(jnp.where(mask, losses, 0.0))

  loss_sum, grad_sum = jax.value_and_grad(summed)(params)
  return loss_sum, grad_sum, jnp.sum(mask, dtype=jnp.int32)


def _per_example_value_and_grad(loss_fn: LossFn, params: PyTree, batch: PyTree):
  def one(p, example):
    return loss_fn(p, jax.tree.map(lambda x: x[None], example))[0]

  return jax.vmap(jax.value_and_grad(one), in_axes=(None, 0))(params, batch)


def _masked_rows(mask: jax.Array, tree: PyTree) -> PyTree:
  def where(x):
    m = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
    return jnp.where(m, x, jnp.zeros((), x.dtype))

  return jax.tree.map(where, tree)


def _row_vdot(per_example: PyTree, direction: PyTree) -> jax.Array:
  """<g_i, d> for each row i of a per-example pytree, float32 (B,)."""
  parts = jax.tree.map(
      lambda g, d: jnp.sum(
          (g.astype(jnp.float32) * d.astype(jnp.float32)[None]).reshape(g.shape[0], -1), axis=1
      ),
      per_example,
      direction,
  )
  return sum(jax.tree.leaves(parts))


def _chunk_sums(loss_fn, params, batch, mask):
  """(Σ loss, Σ g_i, Σ ||g_i||²) over the real rows of one chunk."""
  losses, grads = _per_example_value_and_grad(loss_fn, params, batch)
  grads = _masked_rows(mask, grads)
  loss_sum = jnp.sum(jnp.where(mask, losses, 0.0)).astype(jnp.float32)
  sum_g = jax.tree.map(lambda g: jnp.sum(g.astype(jnp.float32), axis=0), grads)
  sum_sq = jnp.sum(_row_vdot(grads, grads))
  return loss_sum, sum_g, sum_sq, grads


def _split_chunks(tree: PyTree, num_chunks: int, chunk: int) -> PyTree:
  def split(x):
    pad = num_chunks * chunk - x.shape[0]
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((num_chunks, chunk) + x.shape[1:])

  return jax.tree.map(split, tree)


def _sum_over_chunks(fn, batch: PyTree, mask: jax.Array, chunk_size: int | None) -> PyTree:
  """Σ over chunks of ``fn(part, part_mask)`` (a pytree of sums), scanning chunks in turn.

  One call on the whole batch when ``chunk_size`` is None or at least B.
  """
  b = batch_size_of(batch)
  if chunk_size is None or chunk_size >= b:
    return fn(batch, mask)
  num_chunks = -(-b // chunk_size)
  chunks = _split_chunks(batch, num_chunks, chunk_size)
  chunk_masks = _split_chunks(mask, num_chunks, chunk_size)

  def add_chunk(total, xs):
    return jax.tree.map(jnp.add, total, fn(*xs)), None

  first = jax.tree.map(lambda x: x[0], (chunks, chunk_masks))
  zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *first))
  total, _ = jax.lax.scan(add_chunk, zero, (chunks, chunk_masks))
  return total


def _jvp_sum_ip(loss_fn: LossFn, params: PyTree, gbar: PyTree, batch: PyTree, mask: jax.Array):
  """Σ_i <g_i, ḡ>² over the real rows by one JVP: <g_i, ḡ> = d/dε loss_i(params + ε·ḡ)."""
  tangent = jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), gbar, params)
  _, directional = jax.jvp(lambda p: loss_fn(p, batch), (params,), (tangent,))
  return jnp.sum(jnp.where(mask, directional.astype(jnp.float32), 0.0) ** 2)


def _record_with_jvp_ip(loss_fn, params, batch, mask, chunk_size, loss_sum, sum_g, sum_sq):
  """Completes sums from a first pass into a record, ``sum_ip`` by :func:`_jvp_sum_ip`."""
  count = jnp.sum(mask, dtype=jnp.int32)
  gbar = jax.tree.map(lambda s: s / jnp.maximum(count, 1).astype(jnp.float32), sum_g)
  sum_ip = _sum_over_chunks(
      lambda part, part_mask: _jvp_sum_ip(loss_fn, params, gbar, part, part_mask),
      batch,
      mask,
      chunk_size,
  )
  return loss_sum, sum_g, GradientStats(count, sum_g, sum_sq, sum_ip)


def _exact(loss_fn, params, batch, mask, chunk_size):
  b = batch_size_of(batch)
  count = jnp.sum(mask, dtype=jnp.int32)
  n = jnp.maximum(count, 1).astype(jnp.float32)
  if chunk_size is None or chunk_size >= b:
    loss_sum, sum_g, sum_sq, grads = _chunk_sums(loss_fn, params, batch, mask)
    gbar = jax.tree.map(lambda s: s / n, sum_g)
    sum_ip = jnp.sum(_row_vdot(grads, gbar) ** 2)
    return loss_sum, sum_g, GradientStats(count, sum_g, sum_sq, sum_ip)

  def first_pass(part, part_mask):
    return _chunk_sums(loss_fn, params, part, part_mask)[:3]

  loss_sum, sum_g, sum_sq = _sum_over_chunks(first_pass, batch, mask, chunk_size)
  gbar = jax.tree.map(lambda s: s / n, sum_g)

  def second_pass(part, part_mask):
    _, grads = _per_example_value_and_grad(loss_fn, params, part)
    return jnp.sum(_row_vdot(_masked_rows(part_mask, grads), gbar) ** 2)

  sum_ip = _sum_over_chunks(second_pass, batch, mask, chunk_size)
  return loss_sum, sum_g, GradientStats(count, sum_g, sum_sq, sum_ip)


def _ghost_norms(loss_fn, params, batch, mask, chunk_size):
  def first_pass(part, part_mask):
    sums = taps.ghost_sums(loss_fn, params, part, part_mask)
    return sums.loss_sum, sums.sum_g, jnp.sum(sums.sq_norms)

  sums = _sum_over_chunks(first_pass, batch, mask, chunk_size)
  return _record_with_jvp_ip(loss_fn, params, batch, mask, chunk_size, *sums)


def default_micro_batch_size(batch_size: int) -> int:
  """The micro-batch size of ``method="microbatch"`` when ``chunk_size`` is None: B // 8."""
  return max(1, batch_size // 8)


_MICRO_BATCH_UNROLL = 8


def _microbatch(loss_fn, params, batch, mask, chunk_size):
  b = batch_size_of(batch)
  m = default_micro_batch_size(b) if chunk_size is None else chunk_size
  k = -(-b // m)
  if k < 2:
    raise ValueError(
        f"method='microbatch' needs at least two micro-batches: chunk_size (the micro-batch "
        f"size) must be in [1, {b - 1}] for a batch of {b} rows, got {m}."
    )

  def strided(tree):  # row i goes to micro-batch i mod k: trailing padding keeps counts even
    return jax.tree.map(lambda x: x.swapaxes(0, 1), _split_chunks(tree, m, k))

  def add_micro_batch(carry, xs):
    part, part_mask = xs
    loss_sum, grad_sum, count = masked_loss_and_grad(loss_fn, params, part, part_mask)
    grad_sum = jax.tree.map(lambda g: g.astype(jnp.float32), grad_sum)
    weighted_sq = tree_sq_norm(grad_sum) / jnp.maximum(count, 1).astype(jnp.float32)
    update = (loss_sum.astype(jnp.float32), grad_sum, weighted_sq, (count > 0).astype(jnp.int32))
    return jax.tree.map(jnp.add, carry, update), None

  zero = (
      jnp.zeros((), jnp.float32),
      empty_stats(params).sum_g,
      jnp.zeros((), jnp.float32),
      jnp.zeros((), jnp.int32),
  )
  # Unrolled up to 8 micro-batches: XLA:CPU runs convolutions inside loops several
  # times slower (jax-ml/jax#12868); beyond 8 the loop bounds the compile time.
  (loss_sum, sum_g, weighted_sq, nonempty), _ = jax.lax.scan(
      add_micro_batch, zero, (strided(batch), strided(mask)), unroll=min(k, _MICRO_BATCH_UNROLL)
  )
  n = jnp.sum(mask, dtype=jnp.int32).astype(jnp.float32)
  gbar_sq = tree_sq_norm(sum_g) / jnp.maximum(n, 1.0) ** 2
  spread = weighted_sq - n * gbar_sq  # Σ_j n_j ||ĝ_j − ḡ||², expectation (K − 1)·tr Σ
  trace = jnp.where(nonempty >= 2, spread / jnp.maximum(nonempty - 1, 1).astype(jnp.float32), 0.0)
  sum_sq = n * gbar_sq + jnp.maximum(n - 1.0, 0.0) * trace
  return _record_with_jvp_ip(loss_fn, params, batch, mask, m, loss_sum, sum_g, sum_sq)


def preferred_method(loss_fn: LossFn, params: PyTree, batch: PyTree) -> str:
  """What ``method="auto"`` runs: ``"ghost"``, or ``"exact"`` where taps gain nothing.

  Both give exact statistics. The taps (:mod:`divebatch_jax.stats.taps`) cover
  dense, convolution and embedding kernels in the cheaper of the Gram and the
  product form and elementwise leaves (biases, norm scales) as (B, C) arrays; the
  rest falls back to per-example copies of the leaf, as the exact method does for
  every leaf. So ``"exact"`` is chosen when fallback leaves hold at least half of
  the parameters (:meth:`~divebatch_jax.stats.taps.GhostPlan.fallback_share`),
  ``"ghost"`` otherwise. ``"microbatch"`` is never chosen: it estimates ``sum_sq``
  rather than computing it. ``benchmarks/stats_overhead.py`` times every method
  against a plain step for the CLI's models.
  """
  share = taps.trace_plan(loss_fn, params, batch).fallback_share()
  return "ghost" if share < 0.5 else "exact"


_METHOD_FNS = {"exact": _exact, "ghost": _ghost_norms, "microbatch": _microbatch}


def gradient_stats(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    mask: jax.Array | None = None,
    *,
    method: str = "exact",
    chunk_size: int | None = None,
) -> tuple[jax.Array, PyTree, GradientStats]:
  """Mean loss, mean gradient and per-example statistics over the real rows.

  Args:
    loss_fn: pure ``loss_fn(params, batch) -> (B,)`` per-example losses. Row i
      must depend on example i only (no BatchNorm in train mode; see
      docs/sharp_edges.md).
    params: the parameter pytree to differentiate.
    batch: pytree of arrays sharing a leading axis B.
    mask: bool (B,), True for real rows; None means every row is real. Padded
      rows never count in any statistic.
    method: how the statistics are computed (all return the same record):

      * ``"exact"``: vmap of per-example gradients; B × parameters of memory.
      * ``"ghost"``: exact per-example norms from each dense, convolution and
        embedding layer's input and output cotangent (:mod:`divebatch_jax.stats.taps`),
        per-example gradients only for the other leaves (biases, norm scales), in
        one backward pass. ``<g_i, ḡ>`` for ``sum_ip`` comes from the same layers
        (``<Ȳ_i, layer(X_i; ḡ)>``); with ``chunk_size`` below B, where ḡ is only
        known after the last chunk, from one JVP of the per-example losses in the
        direction ḡ.
      * ``"microbatch"``: no per-example gradient. Row i joins micro-batch
        j = i mod K (K = ⌈B/m⌉, m = ``chunk_size``, default
        :func:`default_micro_batch_size`); the K micro-batch gradients
        ĝ_j (means over their n_j real rows) are computed in turn. With N real
        rows, ḡ their mean and K' the number of non-empty micro-batches::

            tr Σ  ≈ Σ_j n_j ||ĝ_j − ḡ||² / (K' − 1)
            sum_sq = N·||ḡ||² + (N − 1)·tr Σ

        (ALGORITHMS.md §5 with unequal n_j): unbiased for Σ_i ||g_i||² when the
        rows are exchangeable (a shuffled batch), and exact when m = 1. With
        K' < 2, tr Σ is taken as 0 (exact for N ≤ 1). ``count``, ``sum_g`` and
        ``sum_ip`` are exact (``sum_ip`` by the JVP, in chunks of m rows).
      * ``"auto"``: :func:`preferred_method`.

      Inside ``jax.jit`` XLA drops whatever only feeds outputs the caller never
      reads: a ``sum_ip`` left unread costs nothing.
    chunk_size: process at most this many examples at once (bounds memory to
      ``chunk_size`` × parameters for the exact method and to ``chunk_size``
      rows of activations for ghost norms; the micro-batch size for
      ``"microbatch"``, which then needs at least two micro-batches).

  Returns:
    ``(loss, grad, stats)``: mean loss (float32), mean gradient (params' dtypes)
    over real rows, and a :class:`GradientStats` record. With no real row the
    loss and gradient are zero and the record is empty.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
  mask = resolve_mask(batch, mask)
  if method == "auto":
    method = preferred_method(loss_fn, params, batch)
  loss_sum, sum_g, stats = _METHOD_FNS[method](loss_fn, params, batch, mask, chunk_size)
  n = safe_count(stats)
  grad = jax.tree.map(lambda s, p: (s / n).astype(jnp.result_type(p)), sum_g, params)
  return loss_sum / n, grad, stats
