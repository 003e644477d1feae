"""``divebatch_jax.nnx.value_and_grad``: ``nnx.value_and_grad`` that also returns the statistics.

For a Flax nnx model and ``loss_fn(model, batch)`` returning per-example losses ``(B,)``
(or ``(losses, aux)`` with ``has_aux=True``, e.g. the logits)::

    grad_fn = divebatch_jax.nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, logits), grads, stats = grad_fn(model, batch)        # mask= for padded rows
    optimizer.update(model, grads, stats=stats)                  # nnx.Optimizer(model, tx, wrt=nnx.Param)

``loss`` is the mean over the real rows, ``grads`` the ``nnx.State`` of the model's
``nnx.Param`` that ``nnx.value_and_grad`` gives for that mean, and ``stats`` the step's
:class:`~divebatch_jax.GradientStats`. Stateful layers behave as under
``nnx.value_and_grad``: Dropout draws from the model's RNG streams (which advance once
per call) and BatchNorm in train mode updates its running averages from the batch.

How the statistics are taken depends on the model (``method="auto"``):

* no BatchNorm in train mode, no active Dropout: :func:`divebatch_jax.preferred_method`
  (exact per-example gradients, from one backward pass where the taps allow);
* active Dropout: ``"exact"``, each row run alone on the model's RNG streams folded
  with its row index, so the rows draw independent dropout masks as they do in the
  batch (a plain vmap per example would give every row the same mask; with BatchNorm
  each micro-batch draws on streams folded with its first row's index). ``grads`` come
  from the full-batch pass that ``nnx.value_and_grad`` runs, so the record describes
  the same dropout distribution as the step, not its very masks (``"ghost"`` is refused);
* BatchNorm in train mode: the rows are coupled through the batch statistics, so a
  per-example gradient is not defined; ``"microbatch"`` (gradients of micro-batches,
  each normalised by its own statistics) estimates Δ̂, and ``grads`` come from a
  separate full-batch pass. ``"exact"`` and ``"ghost"`` are refused with the choice named.

Padded rows (``mask``) never count in the loss, gradient or statistics, but a
BatchNorm layer sees them in its batch statistics unless the model masks them.

**Linen.** :func:`divebatch_jax.gradient_stats` on a pure per-example loss does the same.
Dropout: run each row alone with the dropout key folded with its row index, so rows
draw independent masks however the kernel chunks them, and pass ``(batch, jnp.arange(B))``::

    def losses(params, rows):
      rows_of, index = rows
      one = lambda x, y, i: ce(model.apply({"params": params}, x[None], True,
                                           rngs={"dropout": jax.random.fold_in(key, i)}), y[None])[0]
      return jax.vmap(one)(rows_of["x"], rows_of["y"], index)

    loss, grads, stats = divebatch_jax.gradient_stats(losses, params, (batch, jnp.arange(B)))

(split ``key`` each step). BatchNorm: apply with ``{"params": params, "batch_stats": bs}``
and ``mutable=["batch_stats"]``, take the losses for ``method="microbatch"`` and the new
``batch_stats`` from one full-batch ``apply`` (tests/test_nnx.py, ``test_linen_*``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from divebatch_jax.stats import kernel

METHODS = ("auto", "exact", "ghost", "microbatch")


def _stateful_layers(model: nnx.Module) -> tuple[bool, bool]:
  """(a BatchNorm in train mode, an active Dropout) somewhere in ``model``."""
  batch_norm = dropout = False
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.BatchNorm) and not node.use_running_average:
      batch_norm = True
    if isinstance(node, nnx.Dropout) and node.rate > 0 and not node.deterministic:
      dropout = True
  return batch_norm, dropout


def resolve_method(model: nnx.Module, method: str) -> str:
  """The statistics method ``value_and_grad`` uses for ``model`` (see the module doc)."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  batch_norm, dropout = _stateful_layers(model)
  if batch_norm and method in ("exact", "ghost"):
    raise ValueError(
        f"method={method!r} on a model with BatchNorm in train mode: its rows are coupled through the "
        "batch statistics, so per-example gradients measure another diversity; use method='microbatch' "
        "(what 'auto' picks), or call model.eval() for BatchNorm's running averages."
    )
  if dropout and method == "ghost":
    raise ValueError(
        "method='ghost' on a model with active Dropout: its per-row passes draw their own masks; use "
        "method='exact' (what 'auto' picks) or 'microbatch'."
    )
  if method != "auto":
    return method
  return "microbatch" if batch_norm else "exact" if dropout else "auto"


def _fold_keys(rest: nnx.State, index: jax.Array) -> nnx.State:
  """``rest`` with every RNG key folded with ``index``: the draws of one row."""
  fold = lambda v: v.replace(jax.random.fold_in(v[...], index)) if isinstance(v, nnx.RngKey) else v
  return jax.tree.map(fold, rest, is_leaf=lambda v: isinstance(v, nnx.Variable))


def _chunk_draws(call: Callable, rest: nnx.State) -> Callable:
  """Per-example losses of ``(rows, row indices)``: each chunk the statistics kernel
  evaluates (one row, or one micro-batch) runs on RNG streams folded with its first
  row's index, so chunks draw independent dropout masks."""

  def losses(p, rows_and_index):
    rows_of, index = rows_and_index
    return call(p, rows_of, _fold_keys(rest, index[0]))[0]

  return losses


def value_and_grad(
    loss_fn: Callable[[Any, Any], Any],
    *,
    has_aux: bool = False,
    method: str = "auto",
    chunk_size: int | None = None,
) -> Callable:
  """``f(model, batch, mask=None) -> (loss or (loss, aux), grads, stats)``.

  Args:
    loss_fn: ``loss_fn(model, batch)`` returning per-example losses ``(B,)``, or
      ``(losses, aux)`` with ``has_aux``.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``; ``aux`` comes back as is
      (from the step's batched forward pass).
    method: ``"auto"`` (the module doc's choice for the model), ``"exact"``,
      ``"ghost"`` or ``"microbatch"`` (:func:`divebatch_jax.gradient_stats`).
    chunk_size: as in :func:`divebatch_jax.gradient_stats` (the micro-batch size
      of ``"microbatch"``).

  Returns:
    ``f``; it updates ``model``'s non-parameter state (RNG counts, BatchNorm
    averages) in place, as ``nnx.value_and_grad`` does, and works under ``nnx.jit``.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")

  def f(model: nnx.Module, batch: Any, mask: jax.Array | None = None):
    chosen, (batch_norm, dropout) = resolve_method(model, method), _stateful_layers(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def call(p, rows_of, state=rest):
      copy = nnx.merge(graphdef, p, state, copy=True)
      out = loss_fn(copy, rows_of)
      losses, aux = out if has_aux else (out, None)
      return losses, aux, nnx.state(copy, nnx.Not(nnx.Param))

    if not (batch_norm or dropout):
      loss, grads, stats = kernel.gradient_stats(
          lambda p, rows_of: call(p, rows_of)[0], params, batch, mask, method=chosen, chunk_size=chunk_size)
      aux, new_rest = None, rest
      if has_aux or jax.tree.leaves(rest):
        _, aux, new_rest = call(params, batch)
    else:
      stats_loss = _chunk_draws(call, rest) if dropout else (lambda p, rows_of: call(p, rows_of)[0])
      stats_batch = (batch, jnp.arange(kernel.batch_size_of(batch))) if dropout else batch
      _, _, stats = kernel.gradient_stats(stats_loss, params, stats_batch, mask, method=chosen, chunk_size=chunk_size)
      rows = kernel.resolve_mask(batch, mask)

      def mean_loss(p):
        losses, aux, new_rest = call(p, batch)
        total = jnp.sum(jnp.where(rows, losses, 0.0)) / jnp.maximum(jnp.sum(rows), 1)
        return total.astype(jnp.float32), (aux, new_rest)

      (loss, (aux, new_rest)), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    nnx.update(model, new_rest)
    return ((loss, aux) if has_aux else loss), grads, stats

  return f
