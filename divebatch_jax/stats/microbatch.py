"""The micro-batch engine: one summation over the micro-batches of a step, used by every step.

A step of b examples runs as K micro-batches of m rows (leaves ``(K, m, ...)``, a
``(K, m)`` mask of real rows). Every quantity is a *sum* over real rows; the
micro-batches' sums are added and the step divides once by the real count::

    loss = Σ_k Σ_{i real in k} ℓ_i / b,      grad = Σ_k Σ_{i real in k} g_i / b

so micro-batches holding different numbers of real rows are weighted by those
numbers (averaging micro-batch means would not be). :func:`sum_micro_batches` is
the one loop that does it inside a jitted function — for the plain step, the
statistics step, evaluation, ``gradient_stats``' chunks and the micro-batch
estimator's groups. It is unrolled on XLA:CPU, which runs convolutions inside loop
bodies several times slower (jax-ml/jax#12868), and a scan elsewhere (the same
speed there and a fraction of the compile time, benchmarks/results/device_batch_gpu.md).
A host loop over calls (one micro-batch per call, ``divebatch_jax.transform.TrainStep``)
adds the same :class:`StepSums` with :func:`add_sums`.

What a micro-batch contributes is a :class:`StepSums`: the loss and gradient sums,
the real count, the exact Σ||g_i||² when a per-example method ran, and — free in
every step — the squared norm of the micro-batch's own gradient sum, which is what
the micro-batch estimator of Σ||g_i||² needs (:func:`estimated_sum_sq`,
docs/algorithms.md): a step that already splits its batch into K ≥ 2 micro-batches
gets that estimate without a second pass (devices' shares are not used as groups).

Example (K = 2 micro-batches of m = 4 rows, 4 + 2 real; the first's rows have loss 4.5 and
gradient (3, 3, 3), the second's 0: the step's mean is over the 6 rows, not the 2 means)::

    >>> import jax, jax.numpy as jnp
    >>> from divebatch_jax.stats import accumulate_gradients
    >>> def loss_fn(w, batch):
    ...   return 0.5 * (batch["x"] @ w - batch["y"]) ** 2
    >>> batch = {"x": jnp.ones((2, 4, 3)), "y": jnp.array([[0.0] * 4, [3.0] * 4])}
    >>> mask = jnp.array([[True] * 4, [True, True, False, False]])
    >>> loss, grad, _ = jax.jit(accumulate_gradients, static_argnums=0)(loss_fn, jnp.ones(3), batch, mask)
    >>> float(loss), grad.tolist()                   # 4 · 4.5 / 6, 4 · 3 / 6
    (3.0, [2.0, 2.0, 2.0])
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from divebatch_jax.stats.records import PyTree, tree_sq_norm


class StepSums(NamedTuple):
  """Sums over the real rows of one or more micro-batches of a step (float32 / int32).

  Attributes:
    loss_sum: Σ_i ℓ_i.
    count: real rows.
    sum_g: Σ_i g_i, float32, shaped like the parameters.
    sum_sq: Σ_i ||g_i||² where a per-example method ran (0 otherwise).
    group_sq: Σ_j ||G_j||² / n_j over the non-empty micro-batches j (G_j the sum of
      their n_j gradients): the micro-batch estimator's input.
    groups: non-empty micro-batches.
    sum_ip: Σ_i <g_i, ḡ>² about the mean ḡ of the rows it was computed over, from the
      same backward pass (``micro_batch_sums(..., with_ip=True)``; 0 otherwise).
      Added over micro-batches it is the sum of their values, each about its own
      mean: the step's ``sum_ip`` only for a step of one micro-batch.
  """

  loss_sum: jax.Array
  count: jax.Array
  sum_g: PyTree
  sum_sq: jax.Array
  group_sq: jax.Array
  groups: jax.Array
  sum_ip: jax.Array


def zero_sums(params: PyTree) -> StepSums:
  """The identity of :func:`add_sums` for ``params``."""
  f32 = lambda: jnp.zeros((), jnp.float32)
  i32 = lambda: jnp.zeros((), jnp.int32)
  sum_g = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  return StepSums(f32(), i32(), sum_g, f32(), f32(), i32(), f32())


def add_sums(a: StepSums, b: StepSums) -> StepSums:
  """Field-by-field sum (pure; jittable)."""
  return jax.tree.map(jnp.add, a, b)


def group_sums(loss_sum: jax.Array, grad_sum: PyTree, count: jax.Array) -> StepSums:
  """The sums of one micro-batch from its plain gradient: ``group_sq`` comes free."""
  grad_sum = jax.tree.map(lambda g: g.astype(jnp.float32), grad_sum)
  nonempty = count > 0
  group_sq = jnp.where(nonempty, tree_sq_norm(grad_sum) / jnp.maximum(count, 1).astype(jnp.float32), 0.0)
  return StepSums(
      loss_sum.astype(jnp.float32), count.astype(jnp.int32), grad_sum, jnp.zeros((), jnp.float32),
      group_sq, nonempty.astype(jnp.int32), jnp.zeros((), jnp.float32),
  )


def estimated_sum_sq(sums: StepSums) -> jax.Array:
  """The micro-batch estimate of Σ_i ||g_i||² from ``group_sq`` (docs/algorithms.md).

  With N real rows, ḡ their mean and K' non-empty micro-batches of n_j rows with
  mean gradients ĝ_j::

      tr Σ   ≈ Σ_j n_j ||ĝ_j − ḡ||² / (K' − 1) = (group_sq − N·||ḡ||²) / (K' − 1)
      sum_sq = N·||ḡ||² + (N − 1)·tr Σ

  unbiased when the rows are exchangeable (a shuffled batch), exact when every
  micro-batch holds one row; tr Σ is taken as 0 when K' < 2.
  """
  n = sums.count.astype(jnp.float32)
  gbar_sq = tree_sq_norm(sums.sum_g) / jnp.maximum(n, 1.0) ** 2
  spread = sums.group_sq - n * gbar_sq
  trace = jnp.where(sums.groups >= 2, spread / jnp.maximum(sums.groups - 1, 1).astype(jnp.float32), 0.0)
  return n * gbar_sq + jnp.maximum(n - 1.0, 0.0) * trace


def loop_unroll(backend: str | None = None) -> int | bool:
  """How :func:`sum_micro_batches` unrolls on ``backend``: fully on the CPU, not elsewhere."""
  return True if (backend or jax.default_backend()) == "cpu" else 1


def sum_micro_batches(
    fn: Callable[[Any, PyTree, jax.Array], tuple[Any, PyTree]],
    batch: PyTree,
    mask: jax.Array,
    carry: Any = (),
) -> tuple[Any, PyTree]:
  """``(carry, Σ_k sums_k)`` where ``(carry, sums_k) = fn(carry, batch[k], mask[k])``.

  ``batch`` has leaves ``(K, m, ...)`` and ``mask`` is ``(K, m)``; ``carry`` threads
  state from one micro-batch to the next (e.g. BatchNorm's running averages).
  """
  first = jax.tree.map(lambda x: x[0], (batch, mask))
  _, shapes = jax.eval_shape(fn, carry, *first)
  zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def body(state, xs):
    carry, total = state
    carry, sums = fn(carry, *xs)
    return (carry, jax.tree.map(jnp.add, total, sums)), None

  (carry, total), _ = jax.lax.scan(
      body, (carry, zero), (batch, mask), unroll=loop_unroll()
  )
  return carry, total


def split_rows(tree: PyTree, num_groups: int, rows: int) -> PyTree:
  """Leaves ``(B, ...)`` as ``(num_groups, rows, ...)``, zero-padded at the end."""

  def split(x):
    pad = num_groups * rows - x.shape[0]
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((num_groups, rows) + x.shape[1:])

  return jax.tree.map(split, tree)


def strided_groups(tree: PyTree, num_groups: int) -> PyTree:
  """Leaves ``(B, ...)`` as ``(num_groups, ⌈B/num_groups⌉, ...)``, row i in group i mod K.

  Trailing padding rows then spread over the groups, keeping their real counts even.
  """
  rows = -(-jax.tree.leaves(tree)[0].shape[0] // num_groups)
  return jax.tree.map(lambda x: x.swapaxes(0, 1), split_rows(tree, rows, num_groups))
