"""``adaptive_batch``: an Optax transformation that decides the batch size on device.

It wraps any optax transformation ``inner`` and, at every update:

1. counts the examples of the step — ``stats.count`` when statistics are passed,
   else the ``count`` keyword, else ``min(b, n − position)`` (the data pipeline's
   contract: a step takes the next ``b`` examples of the epoch's order, the last
   step of an epoch the rest); epoch boundaries follow from ``num_examples`` = n;
2. hands the step to the policy, which accumulates what it needs and, at its
   decision points, returns the next batch size — all on device, no host sync;
   the size is kept in ``[1, n]`` and, with ``batch_sizes``, rounded to the
   nearest size the caller's engine runs without padding (never below the
   current size for a rule that does not shrink; the rule's own value stays in
   the state as ``requested``);
3. runs ``inner`` and multiplies its updates by the learning-rate scale in force
   for this step: ``lr_rule(b, b0) × policy multiplier`` (optionally capped).
   The default rule is ``"none"``: the rate you set is the rate you get.

The host reads :func:`current_batch_size` once per decision point (e.g. per
epoch, passing ``epoch=`` to have drift between its loop and the count here
reported) and hands the plain int to the data pipeline.

Example (flax nnx; two epochs of 8 examples: DiveBatch measures Δ̂ ≈ 0.25 over epoch 0 and
sets b = ⌊δ·n·Δ̂⌋ = ⌊2 · 8 · 0.25⌋ = 4 for epoch 1)::

    >>> import optax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import divebatch_jax as dbj
    >>> model = nnx.Linear(2, 1, use_bias=False, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))
    >>> def loss_fn(model, batch):                    # per-example squared error, (B,)
    ...   return 0.5 * (model(batch["x"])[:, 0] - batch["y"]) ** 2
    >>> grad_fn = dbj.nnx.value_and_grad(loss_fn)     # nnx.value_and_grad, plus the statistics
    >>> tx = dbj.adaptive_batch(
    ...     optax.sgd(0.1), dbj.policies.divebatch(delta=2.0, max_batch_size=8, resize_every=1),
    ...     num_examples=8, base_batch_size=2)
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> x, y = jnp.tile(jnp.eye(2), (4, 1)), jnp.ones(8)
    >>> for epoch in range(2):
    ...   b = dbj.current_batch_size(optimizer.opt_state, epoch=epoch)
    ...   for start in range(0, 8, b):
    ...     batch = {"x": x[start:start + b], "y": y[start:start + b]}
    ...     loss, grads, stats = grad_fn(model, batch)
    ...     _ = optimizer.update(model, grads, stats=stats)   # or count= real rows, without stats
    ...   print(epoch, b)
    0 2
    1 4
    >>> summary = dbj.batch_state_summary(optimizer.opt_state)
    >>> summary["batch_size"], summary["step"], round(summary["statistic"], 2)
    (4, 6, 0.25)
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from divebatch_jax.transform import coupling, lr_rules, noise_ema
from divebatch_jax import stats as stats_lib
from divebatch_jax.stats import records
from divebatch_jax.transform.policies import base as policy_base


class AdaptiveBatchState(NamedTuple):
  """State of :func:`adaptive_batch`.

  Attributes:
    inner_state: the wrapped transformation's state.
    policy_state: the policy's state.
    batch_size: int32, the batch size to use for the next step.
    lr_scale: float32, the factor applied to the next step's updates.
    lr_multiplier: float32, the policy's cumulative lr factor (AdaBatch).
    statistic: float32, the policy's last measured statistic (NaN if none yet).
    noise: smoothed noise components (feed the AdaScale rule).
    steps: int32, optimizer steps taken.
    epoch: int32, 0-based epoch of the next step.
    epoch_position: int32, examples already used in the current epoch.
    examples_seen: int32, examples used since the start.
    progress: float32, Σ over steps of the rule's gain (AdaScale's training
      progress τ; examples / b0 under ``"linear"``; the step count under ``"none"``).
    requested: float32, the policy's own batch size at its last decision, before
      clamping and rounding (NaN before the first).
    decisions: int32, steps at which the policy measured or decided something
      (a new ``statistic`` or ``requested``).
    ramp_from: float32, the lr scale in force when the batch size last changed.
    ramp_step: int32, steps since the batch size last changed.
    window_records: int32, steps of the current measurement window (an epoch, or the
      policy's ``decision_steps``) that passed statistics.
    unmeasured_windows: int32, measurement windows of a statistics-reading policy
      that ended without a single statistics record (the host readers warn).

  No field shares a name with an optax state's field (``count``, ``trace``, ``step``,
  ...), so ``optax.tree.get(opt_state, name)`` finds the inner optimizer's value.
  """

  inner_state: Any
  policy_state: Any
  batch_size: jax.Array
  lr_scale: jax.Array
  lr_multiplier: jax.Array
  statistic: jax.Array
  noise: noise_ema.NoiseEMAState
  steps: jax.Array
  epoch: jax.Array
  epoch_position: jax.Array
  examples_seen: jax.Array
  progress: jax.Array
  requested: jax.Array
  decisions: jax.Array
  ramp_from: jax.Array
  ramp_step: jax.Array
  window_records: jax.Array
  unmeasured_windows: jax.Array


def round_to_sizes(size: jax.Array, current: jax.Array, sizes: tuple[int, ...]) -> jax.Array:
  """The entry of ``sizes`` (ascending) nearest to ``size`` on a log scale, as int32.

  A size above ``current`` never rounds below it: then the smallest entry
  ``>= current`` is taken (``current`` itself when every entry is smaller).
  """
  table = jnp.asarray(sizes, jnp.float32)
  target = jnp.maximum(size.astype(jnp.float32), 1.0)
  nearest = table[jnp.argmin(jnp.abs(jnp.log(table) - jnp.log(target)))]
  now = current.astype(jnp.float32)
  index = jnp.searchsorted(table, now, side="left")
  at_least_now = jnp.where(index < len(sizes), table[jnp.minimum(index, len(sizes) - 1)], now)
  grew = size > current
  return jnp.where(grew & (nearest < now), at_least_now, nearest).astype(jnp.int32)


def _as_int32(value) -> jax.Array:
  return jnp.asarray(value).astype(jnp.int32)


def _check_positive_int(name: str, value) -> None:
  """Validates Python numbers; arrays (e.g. from ``optax.inject_hyperparams``) pass."""
  if not isinstance(value, jax.Array):
    policy_base.check_positive_int(name, value)


class _Counted(NamedTuple):
  """What an update knows of its step before the policy runs."""

  stats: stats_lib.GradientStats
  has_stats: bool
  count: jax.Array
  epoch_end: jax.Array
  position: jax.Array


def _check_stats_cover(updates, stats) -> None:
  """A clear error where ``stats=`` cannot describe ``updates``: a parameter group of
  ``optax.transforms.partition`` (masked updates) against a record of every parameter."""
  leaves = jax.tree.leaves(updates, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  if any(isinstance(leaf, optax.MaskedNode) for leaf in leaves):
    raise ValueError(
        "stats= reached adaptive_batch inside optax.transforms.partition (one parameter group): "
        "the GradientStats record covers every parameter, so a group's diversity cannot be read "
        "from it. Wrap the whole optimizer instead: adaptive_batch(optax.transforms.partition(...), policy, ...)."
    )


def _count_step(updates, state: AdaptiveBatchState, stats, count, n: jax.Array, drop_remainder: bool) -> _Counted:
  """The step's statistics record (empty when not finite) and real rows: ``stats.count``,
  else ``count``, else ``min(b, n − position)``; whether it ends the epoch (with
  ``drop_remainder``, also when fewer than b examples are left)."""
  has_stats = stats is not None
  if has_stats:
    _check_stats_cover(updates, stats)
    count = stats.count
    finite = jnp.isfinite(stats.sum_sq) & jnp.isfinite(records.tree_sq_norm(stats.sum_g))
    empty = stats_lib.empty_stats(updates)
    stats = jax.tree.map(lambda s, e: jnp.where(finite, s, e).astype(e.dtype), stats, empty)
  else:
    stats = stats_lib.empty_stats(updates)
    if count is None:
      count = jnp.minimum(state.batch_size, n - state.epoch_position)
  count = _as_int32(count)
  position = state.epoch_position + count
  epoch_end = position >= n
  if drop_remainder:
    epoch_end = epoch_end | (n - position < state.batch_size)
  return _Counted(stats, has_stats, count, epoch_end, position)


def _next_batch_size(decided: jax.Array, current: jax.Array, n: jax.Array, batch_sizes) -> jax.Array:
  """The policy's size kept in [1, n] and, when it changed, rounded to ``batch_sizes``."""
  new_b = jnp.clip(decided.astype(jnp.int32), 1, n)
  if batch_sizes is None:
    return new_b
  rounded = jnp.minimum(round_to_sizes(new_b, current, batch_sizes), n)
  return jnp.where(new_b != current, rounded, new_b)


def _ramped(state: AdaptiveBatchState, changed: jax.Array, target: jax.Array, ramp_steps: int):
  """(lr_scale, ramp_from, ramp_step): the scale moving linearly from the one in force
  at the last batch-size change to ``target`` over ``ramp_steps`` steps."""
  ramp_from = jnp.where(changed, state.lr_scale, state.ramp_from)
  limit = jnp.asarray(ramp_steps, jnp.int32)
  ramp_step = jnp.where(changed, 0, jnp.minimum(state.ramp_step + 1, limit)).astype(jnp.int32)
  done = jnp.minimum(1.0, (ramp_step + 1).astype(jnp.float32) / jnp.maximum(limit, 1))
  return (ramp_from + (target - ramp_from) * done).astype(jnp.float32), ramp_from, ramp_step


def _initial_state(inner_state, policy_state, b0: jax.Array, scale: jax.Array, noise, ramp_steps) -> AdaptiveBatchState:
  """The state before the first step; every field its own buffer, so that a jitted step
  may donate the whole state."""
  int_zero = lambda: jnp.zeros((), jnp.int32)
  nan = lambda: jnp.full((), jnp.nan, jnp.float32)
  return AdaptiveBatchState(
      inner_state=inner_state,
      policy_state=policy_state,
      batch_size=b0,
      lr_scale=scale,
      ramp_from=jnp.copy(scale),
      ramp_step=jnp.asarray(ramp_steps, jnp.int32),
      lr_multiplier=jnp.ones((), jnp.float32),
      statistic=nan(),
      noise=noise,
      steps=int_zero(),
      epoch=int_zero(),
      epoch_position=int_zero(),
      examples_seen=int_zero(),
      progress=jnp.zeros((), jnp.float32),
      requested=nan(),
      decisions=int_zero(),
      window_records=int_zero(),
      unmeasured_windows=int_zero(),
  )


def _check_arguments(inner, policy, num_examples, base_batch_size, lr_rule, max_lr_scale, noise_ema_decay,
                     batch_sizes, lr_ramp_steps, lr_batch_coupling):
  """Validates :func:`adaptive_batch`'s arguments; returns ``batch_sizes`` sorted (or None)."""
  if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
    raise TypeError(
        f"inner must be an optax.GradientTransformation (e.g. optax.sgd(0.1)), got {type(inner).__name__}."
    )
  _check_positive_int("num_examples", num_examples)
  _check_positive_int("base_batch_size", base_batch_size)
  lr_rules.check_rule(lr_rule)
  if isinstance(noise_ema_decay, numbers.Real) and not 0 <= noise_ema_decay < 1:
    raise ValueError(f"noise_ema_decay must be in [0, 1), got {noise_ema_decay!r}.")
  if not isinstance(policy, policy_base.BatchSizePolicy):
    raise TypeError(
        f"policy must be a divebatch_jax.policies.BatchSizePolicy, got {type(policy).__name__}."
    )
  if isinstance(num_examples, numbers.Integral) and isinstance(base_batch_size, numbers.Integral):
    limit = min(num_examples, policy.max_batch_size or num_examples)
    if base_batch_size > limit:
      raise ValueError(
          f"base_batch_size must be in [1, {limit}] (the smaller of num_examples={num_examples} "
          f"and the policy's max_batch_size={policy.max_batch_size}), got {base_batch_size}."
      )
  if not isinstance(lr_ramp_steps, jax.Array):  # optax.inject_hyperparams passes arrays
    policy_base.check_positive_int("lr_ramp_steps", lr_ramp_steps, minimum=0)
  if isinstance(max_lr_scale, numbers.Real) and not max_lr_scale > 0:
    raise ValueError(f"max_lr_scale must be > 0 or None, got {max_lr_scale!r}.")
  if lr_batch_coupling is not None:
    if not isinstance(lr_batch_coupling, coupling.LRBatchCoupling):
      raise TypeError(f"lr_batch_coupling must be None or a coupling.LRBatchCoupling (replace_lr_decay), got {type(lr_batch_coupling).__name__}.")
    if lr_rule != "none":
      raise ValueError(f"lr_batch_coupling sets the lr from the batch growth: use lr_rule='none', got {lr_rule!r}.")
  if batch_sizes is None:
    return None
  batch_sizes = tuple(sorted({policy_base.check_positive_int("batch_sizes entry", b) for b in batch_sizes}))
  if not batch_sizes:
    raise ValueError("batch_sizes must be None or a non-empty list of positive ints.")
  return batch_sizes


def adaptive_batch(
    inner: optax.GradientTransformation,
    policy: policy_base.BatchSizePolicy,
    *,
    num_examples: int,
    base_batch_size: int,
    lr_rule: str = "none",
    max_lr_scale: float | None = None,
    noise_ema_decay: float = 0.95,
    batch_sizes: Sequence[int] | None = None,
    lr_ramp_steps: int = 0,
    lr_batch_coupling: coupling.LRBatchCoupling | None = None,
    drop_remainder: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` with an adaptive batch size decided by ``policy``.

  The updates of the step after a decision are multiplied by::

      scale = lr_rule(b, b0) · m · min(S^p, 1/d(t))      (the last factor with the coupling)

  with m the policy's lr multiplier (AdaBatch), S = b/b0, d(t) the base schedule's
  decay at the next step, capped by ``max_lr_scale`` and ramped over ``lr_ramp_steps``.

  Args:
    inner: any optax transformation (its schedules keep running per step).
    policy: a :class:`divebatch_jax.policies.BatchSizePolicy`.
    num_examples: n, examples per epoch (defines epoch boundaries). The batch
      size never exceeds it.
    base_batch_size: b0, the initial batch size and the reference of
      ``lr_rule``; in ``[1, min(n, the policy's max_batch_size)]``.
    lr_rule: ``"none"`` (default: updates are not rescaled), ``"linear"``,
      ``"sqrt"`` or ``"adascale"`` (:mod:`divebatch_jax.transform.lr_rules`).
    max_lr_scale: optional cap on the learning-rate scale.
    noise_ema_decay: β of the noise-component averages used by ``"adascale"``.
    batch_sizes: the batch sizes the caller's engine runs without padding (e.g.
      ``data.BucketLadder.batch_sizes``); the policy's choices are rounded to the
      nearest of them. None keeps every integer.
    lr_ramp_steps: after a batch-size change, move the lr scale from its old
      to its new value linearly over this many steps (0: at once). With
      ``lr_rule="linear"`` a ×16 resize otherwise multiplies the step by 16 at once.
    lr_batch_coupling: None, or :func:`~divebatch_jax.transform.coupling.replace_lr_decay`
      of the schedule ``inner`` follows: the batch growth takes the place of the
      scheduled lr decay (:mod:`divebatch_jax.transform.coupling`); needs
      ``lr_rule="none"``.
    drop_remainder: the loader drops each epoch's last partial batch (e.g.
      ``tf.data``'s ``batch(b, drop_remainder=True)``): an epoch ends once fewer
      than b examples are left, the remainder is not counted.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state,
    params=None, *, stats=None, count=None, **extra)`` takes the batch-mean
    gradient and, optionally, the step's :class:`~divebatch_jax.GradientStats` or,
    without statistics, its number of real rows ``count``; other extra arguments go
    to ``inner``. A record that is not finite (a diverging step) is counted as
    examples without statistics. To skip non-finite steps, put
    ``optax.apply_if_finite`` inside — ``adaptive_batch(optax.apply_if_finite(inner,
    k), ...)`` — so that the skipped step's examples are still counted.
    :class:`~divebatch_jax.TrainStep` takes the same ``policy=`` to know which
    steps to instrument.
  """
  batch_sizes = _check_arguments(
      inner, policy, num_examples, base_batch_size, lr_rule, max_lr_scale, noise_ema_decay, batch_sizes,
      lr_ramp_steps, lr_batch_coupling,
  )
  inner = optax.with_extra_args_support(inner)

  def scale_for(batch_size, lr_multiplier, noise, *, step, epoch):
    """The update scale at ``batch_size`` for the step numbered ``step`` in ``epoch``."""
    scale = lr_rules.lr_scale(lr_rule, batch_size, base_batch_size, noise) * lr_multiplier
    if lr_batch_coupling is not None:
      ratio = jnp.asarray(batch_size, jnp.float32) / base_batch_size
      scale = scale * lr_batch_coupling.factor(ratio, step=step, epoch=epoch)
    if max_lr_scale is not None:
      scale = jnp.minimum(scale, max_lr_scale)
    return scale.astype(jnp.float32)

  def init_fn(params) -> AdaptiveBatchState:
    b0, noise, zero = _as_int32(base_batch_size), noise_ema.init(), jnp.zeros((), jnp.int32)
    scale = scale_for(b0, jnp.ones((), jnp.float32), noise, step=zero, epoch=zero)
    return _initial_state(inner.init(params), policy.init(params), b0, scale, noise, lr_ramp_steps)

  def advance(state: AdaptiveBatchState, step: _Counted) -> AdaptiveBatchState:
    """The bookkeeping of one counted step: the policy's decision and the counters
    (``inner_state`` untouched)."""
    n = _as_int32(num_examples)
    info = policy_base.PolicyInfo(
        stats=step.stats, has_stats=step.has_stats, count=step.count, step=state.steps,
        epoch=state.epoch, epoch_end=step.epoch_end, batch_size=state.batch_size,
        num_examples=n, base_batch_size=_as_int32(base_batch_size),
    )
    decision, policy_state = policy.update(info, state.policy_state)
    noise = noise_ema.update(state.noise, step.stats, noise_ema_decay) if step.has_stats else state.noise
    new_b = _next_batch_size(decision.batch_size, state.batch_size, n, batch_sizes)
    lr_multiplier = decision.lr_multiplier.astype(jnp.float32)
    next_epoch = jnp.where(step.epoch_end, state.epoch + 1, state.epoch)
    target = scale_for(new_b, lr_multiplier, noise, step=state.steps + 1, epoch=next_epoch)
    lr_scale, ramp_from, ramp_step = _ramped(state, new_b != state.batch_size, target, lr_ramp_steps)
    requested = jnp.asarray(decision.requested, jnp.float32)
    measured = ~(jnp.isnan(requested) & jnp.isnan(decision.statistic))
    window_end, records = _window(policy, info, state.window_records)
    starved = window_end & jnp.asarray(policy.needs_stats(state.epoch)) & (records == 0)
    return state._replace(
        policy_state=policy_state, batch_size=new_b, lr_scale=lr_scale, ramp_from=ramp_from,
        ramp_step=ramp_step, lr_multiplier=lr_multiplier,
        statistic=jnp.where(jnp.isnan(decision.statistic), state.statistic, decision.statistic).astype(jnp.float32),
        noise=noise, steps=state.steps + 1, epoch=next_epoch,
        epoch_position=jnp.where(step.epoch_end, 0, step.position).astype(jnp.int32),
        examples_seen=state.examples_seen + step.count,
        progress=state.progress + lr_rules.lr_scale(lr_rule, state.batch_size, base_batch_size, state.noise),
        requested=jnp.where(jnp.isnan(requested), state.requested, requested),
        decisions=state.decisions + measured.astype(jnp.int32),
        window_records=jnp.where(window_end, 0, records).astype(jnp.int32),
        unmeasured_windows=state.unmeasured_windows + starved.astype(jnp.int32),
    )

  def update_fn(updates, state: AdaptiveBatchState, params=None, *, stats=None, count=None, **extra):
    step = _count_step(updates, state, stats, count, _as_int32(num_examples), drop_remainder)
    new_state = advance(state, step)
    inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra)
    inner_updates = jax.tree.map(lambda u: (u * state.lr_scale).astype(u.dtype), inner_updates)
    return inner_updates, new_state._replace(inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _window(policy: policy_base.BatchSizePolicy, info: policy_base.PolicyInfo, records: jax.Array):
  """(whether this step ends a measurement window, steps of the window with statistics):
  the window is an epoch, or ``decision_steps`` steps for a rule with a step cadence."""
  records = records + int(info.has_stats)
  if policy.decision_steps:
    return policy_base.every_n_steps(info, policy.decision_steps), records
  return info.epoch_end, records
