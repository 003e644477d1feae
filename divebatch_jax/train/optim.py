"""From a :class:`~divebatch_jax.train.config.TrainConfig` to the Optax transformation.

The inner optimizer's learning rate is injected (``optax.inject_hyperparams``) and
set by the host once per epoch from an epoch-based schedule, as the published
code's PyTorch schedulers do: a cosine over 200 *epochs* must not depend on how
many steps the growing batch size leaves per epoch. Changing it does not
recompile (it is an array in the state).
"""

from __future__ import annotations

import math

import optax

from divebatch_jax import policies
from divebatch_jax.train.config import TrainConfig, ramp_steps
from divebatch_jax.transform import adaptive_batch


def epoch_learning_rate(config: TrainConfig, epoch: int) -> float:
  """The base learning rate of ``epoch`` (0-based) under ``--schedule``."""
  c = config
  if c.schedule == "constant":
    return c.lr
  if c.schedule == "cosine":  # CosineAnnealingLR with T_max = epochs
    return 0.5 * c.lr * (1 + math.cos(math.pi * epoch / c.epochs))
  passed = sum(epoch >= m for m in c.schedule_milestones)
  return c.lr * c.schedule_gamma**passed


def make_optimizer(
    config: TrainConfig,
    num_examples: int,
    policy: policies.BatchSizePolicy,
    batch_sizes: tuple[int, ...] | None = None,
):
  """``adaptive_batch(inner, policy)`` with an injected, host-set learning rate.

  ``policy`` is the one :func:`divebatch_jax.train.methods.build_policy` built (the loop asks the same object
  for its cadence); ``batch_sizes`` the sizes the engine lays out without padding.
  """
  c = config
  if c.optimizer == "sgd":
    base = optax.inject_hyperparams(optax.sgd)(learning_rate=c.lr, momentum=c.momentum or None)
  elif c.optimizer == "adam":
    base = optax.inject_hyperparams(optax.adam)(learning_rate=c.lr)
  else:
    base = optax.inject_hyperparams(optax.adagrad)(learning_rate=c.lr)
  inner = optax.chain(optax.add_decayed_weights(c.weight_decay), base) if c.weight_decay else base
  return adaptive_batch(
      inner,
      policy,
      num_examples=num_examples,
      base_batch_size=c.batch_size,
      lr_rule=c.lr_rule,
      max_lr_scale=c.max_lr_scale,
      batch_sizes=batch_sizes,
      lr_ramp_steps=ramp_steps(c),
  )
