"""From a :class:`~divebatch_jax.train.config.TrainConfig` to the Optax transformation.

The inner optimizer's learning rate is injected (``optax.inject_hyperparams``) and
set by the host once per epoch from an epoch-based schedule, as the published
code's PyTorch schedulers do: a cosine over 200 *epochs* must not depend on how
many steps the growing batch size leaves per epoch. Changing it does not
recompile (it is an array in the state).

For language models (a run of one or a few epochs) the rate is set before every
step instead (:func:`learning_rate`): a linear warmup over the first
``--warmup-steps`` optimizer steps times the schedule, where ``cosine-examples``
is a cosine over the examples (tokens) the run has used, so that it too does not
depend on how many steps the batch sizes leave::

    lr(s, e) = lr · min(1, (s + 1) / W) · ½ (1 + cos(π · e / (epochs · n)))

(s optimizer steps and e examples before the step, W warmup steps, n examples
per epoch). ``--optimizer adamw`` is ``optax.adamw`` with β = (0.9, 0.99) (a
small model's usual second-moment horizon) and decoupled ``--weight-decay``;
``--clip-norm c`` clips the batch-mean gradient to global norm c before the
optimizer (``optax.clip_by_global_norm``).
"""

from __future__ import annotations

import math

import optax

from divebatch_jax import policies
from divebatch_jax.train.config import TrainConfig, ramp_steps
from divebatch_jax.transform import adaptive_batch


ADAMW_BETAS = (0.9, 0.99)


def sets_rate_per_step(config: TrainConfig) -> bool:
  """Whether the rate changes within an epoch (a warmup, or the cosine over examples)."""
  return config.warmup_steps > 0 or config.schedule == "cosine-examples"


def learning_rate(config: TrainConfig, *, epoch: int, step: int, examples: int, num_examples: int) -> float:
  """The base rate of the next step: warmup × schedule (the module docstring's formula).

  ``step`` and ``examples``: optimizer steps and examples before it; ``num_examples``: n.
  """
  warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
  if config.schedule == "cosine-examples":
    done = min(1.0, examples / (config.epochs * num_examples))
    return warmup * 0.5 * config.lr * (1 + math.cos(math.pi * done))
  return warmup * epoch_learning_rate(config, epoch)


def epoch_learning_rate(config: TrainConfig, epoch: int) -> float:
  """The base learning rate of ``epoch`` (0-based) under ``--schedule``."""
  c = config
  if c.schedule in ("constant", "cosine-examples"):  # cosine-examples: see learning_rate
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
  elif c.optimizer == "adamw":
    b1, b2 = ADAMW_BETAS
    base = optax.inject_hyperparams(optax.adamw)(learning_rate=c.lr, b1=b1, b2=b2, weight_decay=c.weight_decay)
  else:
    base = optax.inject_hyperparams(optax.adagrad)(learning_rate=c.lr)
  coupled_decay = c.weight_decay and c.optimizer != "adamw"
  inner = optax.chain(optax.add_decayed_weights(c.weight_decay), base) if coupled_decay else base
  if c.clip_norm is not None:
    inner = optax.chain(optax.clip_by_global_norm(c.clip_norm), inner)
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
