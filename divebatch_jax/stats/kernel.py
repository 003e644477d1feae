"""The statistics kernel: ``gradient_stats`` and what one micro-batch contributes to a step.

``gradient_stats(loss_fn, params, batch, mask, method=...)`` returns the mean
loss, the mean gradient and a :class:`~divebatch_jax.stats.records.GradientStats`
record over the real rows. The methods: ``"exact"`` (vmap of per-example
gradients), ``"ghost"`` (per-layer taps, :mod:`divebatch_jax.stats.taps`),
``"microbatch"`` (the micro-batch estimator) and ``"auto"``.
:func:`micro_batch_sums` is the same work as a step's building block: the
:class:`~divebatch_jax.stats.microbatch.StepSums` of one micro-batch, with or
without per-example statistics, with auxiliary state (BatchNorm's running
averages) threaded through; :func:`accumulate_gradients` sums them over a
``(K, m)`` layout.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from divebatch_jax.stats import microbatch, taps
from divebatch_jax.stats.microbatch import StepSums
from divebatch_jax.stats.records import GradientStats, PyTree, mean_gradient, safe_count

LossFn = Callable[[PyTree, PyTree], jax.Array]
# With auxiliary state: ``loss_fn(params, aux, batch, mask) -> (losses (B,), new aux)``;
# rows may be coupled within the batch (BatchNorm), so only micro-batch statistics apply.
AuxLossFn = Callable[[PyTree, Any, PyTree, jax.Array], tuple[jax.Array, Any]]

METHODS = ("exact", "ghost", "microbatch", "auto")
PER_EXAMPLE_METHODS = ("exact", "ghost")


def batch_size_of(batch: PyTree) -> int:
  """The leading (batch) dimension shared by every leaf of ``batch`` (at least 1)."""
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
  if not sizes or None in sizes:
    raise ValueError("batch must be a pytree of arrays with a leading batch axis.")
  if len(sizes) != 1:
    raise ValueError(f"batch leaves must share one leading dimension, got sizes {sorted(sizes)}.")
  size = sizes.pop()
  if size < 1:
    raise ValueError("batch must hold at least one row, got 0.")
  return size


def resolve_mask(batch: PyTree, mask: jax.Array | None) -> jax.Array:
  """``mask`` as a bool (B,) array; all rows real when ``mask`` is None."""
  b = batch_size_of(batch)
  if mask is None:
    return jnp.ones((b,), bool)
  mask = jnp.asarray(mask)
  if mask.ndim == 2:
    raise ValueError(
        f"mask has shape {mask.shape}: a (K, m) layout of K micro-batches (a data.Pipeline "
        f"batch). Pass it to divebatch_jax.accumulate_gradients or a TrainStep, or flatten "
        f"batch and mask to (K*m,) rows; gradient_stats takes one batch of shape (B,)."
    )
  if mask.shape != (b,):
    raise ValueError(f"mask must have shape ({b},) to match the batch, got {mask.shape}.")
  return mask.astype(bool)


def check_per_example_loss(loss_fn: LossFn, params: PyTree, batch: PyTree) -> None:
  """Raises the one error every method gives when ``loss_fn`` is not per-example (B,)."""
  b = batch_size_of(batch)
  shape = jax.eval_shape(loss_fn, params, batch).shape
  if shape != (b,):
    raise ValueError(
        f"loss_fn must return per-example losses of shape ({b},) for a batch of {b} rows, got "
        f"shape {shape}: return the vector of losses (no mean, no trailing axis)."
    )


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


def _plain_sums(loss_fn, params, aux, batch, mask):
  """``(StepSums, aux)`` of one micro-batch from its plain gradient."""
  if aux is None:
    loss_sum, grad_sum, count = masked_loss_and_grad(loss_fn, params, batch, mask)
    return microbatch.group_sums(loss_sum, grad_sum, count), None

  def summed(p):
    losses, new_aux = loss_fn(p, aux, batch, mask)
    return jnp.sum(jnp.where(mask, losses, 0.0)), new_aux

  (loss_sum, new_aux), grad_sum = jax.value_and_grad(summed, has_aux=True)(params)
  return microbatch.group_sums(loss_sum, grad_sum, jnp.sum(mask, dtype=jnp.int32)), new_aux


def _masked_rows(mask: jax.Array, tree: PyTree) -> PyTree:
  def where(x):
    m = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
    return jnp.where(m, x, jnp.zeros((), x.dtype))

  return jax.tree.map(where, tree)


def _exact_sums(loss_fn, params, batch, mask, direction=None, about_mean=False):
  """(Σ loss, Σ g_i, Σ ||g_i||², Σ <g_i, v>²) over real rows from vmapped per-example
  gradients: v a ``direction`` d, or with ``about_mean`` ḡ = Σ g_i / count (the last 0
  without either)."""

  def one(p, example):
    return loss_fn(p, jax.tree.map(lambda x: x[None], example))[0]

  losses, grads = jax.vmap(jax.value_and_grad(one), in_axes=(None, 0))(params, batch)
  rows = [g.astype(jnp.float32).reshape(g.shape[0], -1) for g in jax.tree.leaves(_masked_rows(mask, grads))]
  sum_g = jax.tree.map(lambda g: jnp.sum(_masked_rows(mask, g).astype(jnp.float32), axis=0), grads)
  sum_sq = sum(jnp.sum(r**2) for r in rows)
  if about_mean:
    direction = jax.tree.map(lambda s: s / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32), sum_g)
  sum_ip = jnp.zeros((), jnp.float32)
  if direction is not None:
    d = [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(direction)]
    sum_ip = jnp.sum(sum(r @ x for r, x in zip(rows, d)) ** 2)
  loss_sum = jnp.sum(jnp.where(mask, losses, 0.0)).astype(jnp.float32)
  return loss_sum, sum_g, jnp.asarray(sum_sq, jnp.float32), sum_ip


def _ghost_sums(loss_fn, params, batch, mask, direction=None, about_mean=False):
  sums = taps.ghost_sums(loss_fn, params, batch, mask, direction=direction, about_mean=about_mean)
  sum_ip = jnp.zeros((), jnp.float32) if sums.inner_products is None else jnp.sum(sums.inner_products**2)
  return sums.loss_sum, sums.sum_g, jnp.sum(sums.sq_norms), sum_ip


_PER_EXAMPLE_SUMS = {"exact": _exact_sums, "ghost": _ghost_sums}


def _chunked(fn, batch: PyTree, mask: jax.Array, chunk_size: int | None) -> PyTree:
  """Σ over chunks of ``chunk_size`` rows of ``fn(part, part_mask)`` (one call if None or >= B)."""
  b = batch_size_of(batch)
  if chunk_size is None or chunk_size >= b:
    return fn(batch, mask)
  k = -(-b // chunk_size)
  parts = microbatch.split_rows((batch, mask), k, chunk_size)
  return microbatch.sum_micro_batches(lambda carry, part, part_mask: (carry, fn(part, part_mask)), *parts)[1]


def default_micro_batch_size(batch_size: int) -> int:
  """The micro-batch size of ``method="microbatch"`` when ``chunk_size`` is None: B // 8."""
  return max(1, batch_size // 8)


def same_pass_inner_products(method: str | None, chunk_size: int | None, batch_size: int) -> bool:
  """Whether ``sum_ip`` = Σ_i <g_i, ḡ>² about the batch's own mean ḡ comes from the same
  backward pass as the norms: a per-example method (``"exact"``, ``"ghost"``, ``"auto"``)
  over one chunk (``chunk_size`` None or >= ``batch_size``). Otherwise ḡ is known only
  after the whole batch has passed, and ``sum_ip`` takes one more (JVP) pass.
  """
  return method in (*PER_EXAMPLE_METHODS, "auto") and (chunk_size is None or chunk_size >= batch_size)


def _check_method_args(method: str, chunk_size: Any, allowed=METHODS) -> None:
  if method not in allowed:
    raise ValueError(f"method must be one of {allowed}, got {method!r}.")
  if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")


def micro_batch_sums(
    loss_fn: LossFn | AuxLossFn,
    params: PyTree,
    batch: PyTree,
    mask: jax.Array | None = None,
    *,
    method: str | None = None,
    chunk_size: int | None = None,
    aux: Any = None,
    with_ip: bool = False,
) -> tuple[StepSums, Any]:
  """What one micro-batch contributes to its step: ``(StepSums, new aux)``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (B,)``; with ``aux`` given,
      ``loss_fn(params, aux, batch, mask) -> (losses, new_aux)`` (rows may then be
      coupled within the batch, e.g. BatchNorm, and ``method`` must be None or
      ``"microbatch"``).
    method: None for the plain gradient (``group_sq`` included, free); ``"exact"``,
      ``"ghost"`` or ``"auto"`` for the exact Σ||g_i||² as well; ``"microbatch"``
      to split the rows into groups of ``chunk_size`` (default
      :func:`default_micro_batch_size`; at least two groups), each with its own
      gradient, for the micro-batch estimator.
    chunk_size: rows per chunk (per-example methods) or per group (``"microbatch"``).
    aux: auxiliary state threaded through (None: a plain per-example loss).
    with_ip: also ``sum_ip`` = Σ_i <g_i, ḡ>² about this micro-batch's own mean ḡ,
      from the same backward pass (``StepSums.sum_ip``; the step's value when the
      step is this one micro-batch): only where :func:`same_pass_inner_products`.
  """
  if method is not None:
    _check_method_args(method, chunk_size)
  if with_ip and not same_pass_inner_products(method, chunk_size, batch_size_of(batch)):
    raise ValueError(
        f"with_ip=True needs method 'exact', 'ghost' or 'auto' over one chunk (chunk_size None or "
        f">= the batch's {batch_size_of(batch)} rows), got method={method!r}, chunk_size={chunk_size!r}."
    )
  mask = resolve_mask(batch, mask)
  if aux is None:
    check_per_example_loss(loss_fn, params, batch)
  if method is None:
    return _plain_sums(loss_fn, params, aux, batch, mask)
  if method == "microbatch":
    b = batch_size_of(batch)
    m = default_micro_batch_size(b) if chunk_size is None else chunk_size
    k = -(-b // m)
    if k < 2:
      raise ValueError(
          f"method='microbatch' needs at least two micro-batches: chunk_size (the micro-batch "
          f"size) must be in [1, {b - 1}] for a batch of {b} rows, got {m}."
      )
    groups, group_masks = microbatch.strided_groups((batch, mask), k)

    def one_group(aux, part, part_mask):
      return _plain_sums(loss_fn, params, aux, part, part_mask)[::-1]

    aux, sums = microbatch.sum_micro_batches(one_group, groups, group_masks, aux)
    return sums, aux
  if aux is not None:
    raise ValueError(
        f"method={method!r} needs per-example gradients, which a loss with auxiliary state "
        "(rows coupled within a batch, e.g. BatchNorm in train mode) does not define: use "
        "method='microbatch' (each micro-batch normalised over its own rows)."
    )
  if method == "auto":
    method = preferred_method(loss_fn, params, batch)
  sums, sum_ip = _per_example_pass(loss_fn, params, batch, mask, method, chunk_size, about_mean=with_ip)
  return sums._replace(sum_ip=sum_ip), None


def _per_example_pass(loss_fn, params, batch, mask, method, chunk_size, direction=None, about_mean=False):
  """``(StepSums, Σ <g_i, v>²)`` by the per-example ``method``, ``chunk_size`` rows at a
  time: v a ``direction`` d, or the mean ḡ of each chunk with ``about_mean`` (the
  batch's when it is one chunk); the last 0 without either."""
  loss_sum, sum_g, sum_sq, sum_ip = _chunked(
      lambda part, part_mask: _PER_EXAMPLE_SUMS[method](loss_fn, params, part, part_mask, direction, about_mean),
      batch, mask, chunk_size,
  )
  count = jnp.sum(mask, dtype=jnp.int32)
  return microbatch.group_sums(loss_sum, sum_g, count)._replace(sum_sq=sum_sq), sum_ip


def record_of(sums: StepSums, sum_ip: jax.Array, *, estimated: bool) -> GradientStats:
  """The step's :class:`GradientStats` from its sums (``estimated``: micro-batch ``sum_sq``)."""
  sum_sq = microbatch.estimated_sum_sq(sums) if estimated else sums.sum_sq
  return GradientStats(sums.count, sums.sum_g, sum_sq, jnp.asarray(sum_ip, jnp.float32))


def mean_loss_and_grad(sums: StepSums, params: PyTree) -> tuple[jax.Array, PyTree]:
  """Σ loss / count and Σ g / count (zeros with no real row), the gradient in params' dtypes."""
  n = safe_count(sums)
  grad = jax.tree.map(lambda s, p: (s / n).astype(jnp.result_type(p)), sums.sum_g, params)
  return sums.loss_sum / n, grad


def jvp_sum_ip(loss_fn: LossFn, params: PyTree, gbar: PyTree, batch: PyTree, mask: jax.Array) -> jax.Array:
  """Σ_i <g_i, ḡ>² over the real rows by one JVP: <g_i, ḡ> = d/dε loss_i(params + ε·ḡ)."""
  tangent = jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), gbar, params)
  _, directional = jax.jvp(lambda p: loss_fn(p, batch), (params,), (tangent,))
  return jnp.sum(jnp.where(mask, directional.astype(jnp.float32), 0.0) ** 2)


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


def gradient_stats(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    mask: jax.Array | None = None,
    *,
    method: str = "exact",
    chunk_size: int | None = None,
    ip_direction: PyTree | None = None,
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
        embedding layer's input and output cotangent in the cheaper of the Gram
        and the product form (:mod:`divebatch_jax.stats.taps`), per-example
        gradients of elementwise leaves (biases, norm scales), in one backward pass.
      * ``"microbatch"``: no per-example gradient. Row i joins micro-batch
        j = i mod K (K = ⌈B/m⌉, m = ``chunk_size``, default
        :func:`default_micro_batch_size`); the K micro-batch gradients
        ĝ_j (means over their n_j real rows) are computed in turn. With N real
        rows, ḡ their mean and K' the number of non-empty micro-batches::

            tr Σ  ≈ Σ_j n_j ||ĝ_j − ḡ||² / (K' − 1)
            sum_sq = N·||ḡ||² + (N − 1)·tr Σ

        (docs/algorithms.md with unequal n_j): unbiased for Σ_i ||g_i||² when the
        rows are exchangeable (a shuffled batch), and exact when m = 1. With
        K' < 2, tr Σ is taken as 0 (exact for N ≤ 1). ``count``, ``sum_g`` and
        ``sum_ip`` are exact (``sum_ip`` by the JVP, in chunks of m rows).
      * ``"auto"``: :func:`preferred_method`.

      Without ``ip_direction``, ``sum_ip`` = Σ_i <g_i, ḡ>² about this batch's mean.
      ``"exact"``, ``"ghost"`` and ``"auto"`` over one chunk (``chunk_size`` None or
      >= B) get it from the same backward pass as the rest: the exact method from
      its per-example gradients, the ghost method from each layer's summed kernel
      gradient once the backward pass has formed it
      (:func:`~divebatch_jax.stats.taps.ghost_sums` with ``about_mean``). With
      several chunks, and for ``"microbatch"``, ḡ is known only after every chunk
      has passed: ``sum_ip`` then comes from one JVP of the per-example losses in
      the direction ḡ (<g_i, ḡ> = d/dε loss_i(params + ε·ḡ)), in chunks of
      ``chunk_size`` rows, a second pass. Inside ``jax.jit`` XLA drops whatever
      only feeds outputs the caller never reads: a ``sum_ip`` left unread costs nothing.
    chunk_size: process at most this many examples at once (bounds memory to
      ``chunk_size`` × parameters for the exact method and to ``chunk_size``
      rows of activations for ghost norms; the micro-batch size for
      ``"microbatch"``, which then needs at least two micro-batches).
    ip_direction: None, or a direction d shaped like ``params`` -- the previous
      step's mean gradient, or a running window's -- standing in for this batch's ḡ:
      then ``sum_ip`` = Σ_i <g_i, d>², computed in the same backward pass as the
      rest by ``"ghost"`` (:func:`~divebatch_jax.stats.taps.ghost_sums`) and
      ``"exact"`` (no second pass), and by the JVP in the direction d for
      ``"microbatch"``. It is the inner-product statistic about d, not about ḡ.

  Returns:
    ``(loss, grad, stats)``: mean loss (float32), mean gradient (params' dtypes)
    over real rows, and a :class:`GradientStats` record. With no real row the
    loss and gradient are zero and the record is empty.
  """
  _check_method_args(method, chunk_size)
  mask = resolve_mask(batch, mask)
  check_per_example_loss(loss_fn, params, batch)
  if method == "auto":
    method = preferred_method(loss_fn, params, batch)
  about_mean = ip_direction is None and same_pass_inner_products(method, chunk_size, batch_size_of(batch))
  if method in PER_EXAMPLE_METHODS and (ip_direction is not None or about_mean):
    sums, sum_ip = _per_example_pass(loss_fn, params, batch, mask, method, chunk_size, ip_direction, about_mean)
    loss, grad = mean_loss_and_grad(sums, params)
    return loss, grad, record_of(sums, sum_ip, estimated=False)
  sums, _ = micro_batch_sums(loss_fn, params, batch, mask, method=method, chunk_size=chunk_size)
  loss, grad = mean_loss_and_grad(sums, params)
  direction = mean_gradient(sums) if ip_direction is None else ip_direction
  ip_chunk = chunk_size if method != "microbatch" else (chunk_size or default_micro_batch_size(batch_size_of(batch)))
  sum_ip = _chunked(lambda part, part_mask: jvp_sum_ip(loss_fn, params, direction, part, part_mask), batch, mask, ip_chunk)
  return loss, grad, record_of(sums, sum_ip, estimated=method == "microbatch")


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
      to also return the step's statistics record, computed over the step's real
      rows ``chunk_size`` (default ``m``) at a time, ``sum_ip`` about the step's
      mean gradient.
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
  _, sums = microbatch.sum_micro_batches(
      lambda carry, part, part_mask: (carry, _plain_sums(loss_fn, params, None, part, part_mask)[0]),
      batch, mask,
  )
  loss, grad = mean_loss_and_grad(sums, params)
  return loss, grad, None


def _check_layout(batch: PyTree, mask: jax.Array) -> tuple[int, int]:
  if jnp.ndim(mask) != 2:
    raise ValueError(
        f"mask must have shape (K, m) (micro-batches, rows), got {jnp.shape(mask)}; for one "
        "batch of shape (B,) use gradient_stats or masked_loss_and_grad."
    )
  k, m = jnp.shape(mask)
  for leaf in jax.tree.leaves(batch):
    if jnp.shape(leaf)[:2] != (k, m):
      raise ValueError(
          f"batch leaves must have leading shape (K, m) = {(k, m)} to match mask, got {jnp.shape(leaf)}."
      )
  return k, m
