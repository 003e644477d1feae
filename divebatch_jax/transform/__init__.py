"""The Optax transformation (the second part of the card) and everything it decides with.

* :mod:`.adaptive` -- :func:`adaptive_batch`, an ``optax.GradientTransformationExtraArgs``
  that counts examples and epochs, asks its policy for the next batch size on
  device, and scales updates by a learning-rate rule.
* :mod:`.readers` -- host readers :func:`current_batch_size`, :func:`batch_state_summary`,
  :func:`find_state`, :func:`set_hyperparameter`.
* :mod:`.policies` -- one small module per batch-size rule, all on one protocol.
* :mod:`.lr_rules` -- ``none``, ``linear``, ``sqrt``, ``adascale``.
* :mod:`.noise_ema` -- smoothed gradient-noise components.
* :mod:`.step` -- :func:`train_step` / :class:`TrainStep`: the ready-made jitted step
  over the micro-batch engine (plain or instrumented per the policy's window,
  ``(K, m)`` layouts, MultiSteps-style accumulation, BatchNorm state).

This package imports jax, optax and :mod:`divebatch_jax.stats` only.
"""

from divebatch_jax.transform import lr_rules, noise_ema, policies
from divebatch_jax.transform.adaptive import AdaptiveBatchState, adaptive_batch, round_to_sizes
from divebatch_jax.transform.readers import (
    batch_state_summary,
    current_batch_size,
    find_state,
    set_hyperparameter,
)
from divebatch_jax.transform.step import StepOutput, TrainState, TrainStep, train_step
