"""From a :class:`~divebatch_jax.train.config.TrainConfig` to the Optax transformation.

The inner optimizer's learning rate is injected (``optax.inject_hyperparams``) and
set by the host from :mod:`divebatch_jax.train.lr_schedule` (by epoch, or per step
for language models). Changing it does not recompile (it is an array in the state).

``--optimizer adamw`` is ``optax.adamw`` with β = (0.9, 0.99) (a
small model's usual second-moment horizon) and decoupled ``--weight-decay``;
``--clip-norm c`` clips the batch-mean gradient to global norm c before the
optimizer (``optax.clip_by_global_norm``).
"""

from __future__ import annotations

import optax

from divebatch_jax import policies
from divebatch_jax.train import methods
from divebatch_jax.train.config import TrainConfig, ramp_steps
from divebatch_jax.train.lr_schedule import epoch_schedule_decay
from divebatch_jax.transform import adaptive_batch, coupling


ADAMW_BETAS = (0.9, 0.99)


def lr_batch_coupling(config: TrainConfig) -> coupling.LRBatchCoupling | None:
  """The run's lr-batch coupling: p = 1 under SGD, 1/2 under the adaptive optimizers."""
  if methods.lr_batch_coupling(config) == "none":
    return None
  power = 1.0 if config.optimizer == "sgd" else 0.5
  return coupling.replace_lr_decay(epoch_schedule_decay(config), power=power)


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
      lr_batch_coupling=lr_batch_coupling(c),
  )
