"""The base learning rate a run follows, from its :class:`~divebatch_jax.train.config.TrainConfig`.

The rate is set by the host once per epoch from an epoch-based schedule, as the
published code's PyTorch schedulers do: a cosine over 200 *epochs* must not depend on
how many steps the growing batch size leaves per epoch.

For language models (a run of one or a few epochs) the rate is set before every
step instead (:func:`learning_rate`): a linear warmup over the first
``--warmup-steps`` optimizer steps times the schedule, where ``cosine-examples``
is a cosine over the examples (tokens) the run has used, so that it too does not
depend on how many steps the batch sizes leave::

    lr(s, e) = lr · min(1, (s + 1) / W) · ½ (1 + cos(π · e / (epochs · n)))

(s optimizer steps and e examples before the step, W warmup steps, n examples
per epoch).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax.numpy as jnp

from divebatch_jax.transform.schedule_decay import ScheduleDecay, schedule_decay

if TYPE_CHECKING:  # read by attribute only: config imports methods, which imports this module
  from divebatch_jax.train.config import TrainConfig


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


def epoch_learning_rate(config: TrainConfig, epoch, xp=math):
  """The base learning rate of ``epoch`` (0-based) under ``--schedule``; with ``xp=jnp``
  on device, for a traced epoch (:func:`epoch_schedule_decay`)."""
  c = config
  if c.schedule in ("constant", "cosine-examples"):  # cosine-examples: see learning_rate
    return c.lr
  if c.schedule == "cosine":  # CosineAnnealingLR with T_max = epochs
    return 0.5 * c.lr * (1 + xp.cos(xp.pi * epoch / c.epochs))
  passed = sum(epoch >= m for m in c.schedule_milestones)
  return c.lr * c.schedule_gamma**passed


def epoch_schedule_decay(config: TrainConfig) -> ScheduleDecay:
  """``--schedule`` as its decay d(epoch) = lr(epoch) / --lr, on device (coupling, Seesaw)."""
  return schedule_decay(lambda epoch: epoch_learning_rate(config, epoch, jnp), peak=config.lr, per="epoch")
