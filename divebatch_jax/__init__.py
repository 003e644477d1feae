"""divebatch_jax: adaptive batch-size training (DiveBatch and peers) for JAX.

Three parts, one package each:
  * :mod:`divebatch_jax.stats` -- the per-example statistics kernel on device
    (``gradient_stats``, ``diversity``, norm-test variances, noise scale) and the
    micro-batch summation every step uses;
  * :mod:`divebatch_jax.transform` -- ``adaptive_batch``, an Optax gradient
    transformation that decides the next batch size on device, with its policies
    (``divebatch_jax.policies``), learning-rate rules, noise smoothing and the
    ready-made step (``train_step``);
  * :mod:`divebatch_jax.data` -- the host-side pipeline that lays batches of any
    size out as static shapes with a mask, so a new batch size does not recompile.

:mod:`divebatch_jax.compilations` counts XLA compilations. :mod:`divebatch_jax.train`
is the shell on top (CLI, loop, models, checkpoints, device mesh); nothing in the
library imports it, and ``import divebatch_jax`` loads neither it nor flax.
"""

__version__ = "0.1.0"

from divebatch_jax import data, policies
from divebatch_jax.compilations import CompileCounter
from divebatch_jax.stats import (
    GradientStats,
    accumulate_gradients,
    combine_stats,
    default_micro_batch_size,
    diversity,
    empty_stats,
    gradient_stats,
    inner_product_variance,
    masked_loss_and_grad,
    mean_gradient,
    noise_components,
    noise_scale,
    norm_test_variance,
    orthogonality_variance,
    preferred_method,
)
from divebatch_jax.transform import (
    AdaptiveBatchState,
    StepOutput,
    TrainState,
    TrainStep,
    adaptive_batch,
    batch_state_summary,
    current_batch_size,
    find_state,
    lr_rules,
    set_hyperparameter,
    train_step,
)
from divebatch_jax.transform.lr_rules import LR_RULES
from divebatch_jax.transform.policies import suggest_delta

__all__ = [
    "AdaptiveBatchState",
    "CompileCounter",
    "GradientStats",
    "LR_RULES",
    "StepOutput",
    "TrainState",
    "TrainStep",
    "accumulate_gradients",
    "adaptive_batch",
    "batch_state_summary",
    "combine_stats",
    "current_batch_size",
    "data",
    "default_micro_batch_size",
    "diversity",
    "empty_stats",
    "find_state",
    "gradient_stats",
    "inner_product_variance",
    "lr_rules",
    "masked_loss_and_grad",
    "mean_gradient",
    "noise_components",
    "noise_scale",
    "norm_test_variance",
    "orthogonality_variance",
    "policies",
    "preferred_method",
    "set_hyperparameter",
    "suggest_delta",
    "train_step",
]


def __getattr__(name: str):
  """``divebatch_jax.nnx`` (Flax nnx helpers) loads flax only when first used."""
  if name == "nnx":
    import importlib

    return importlib.import_module("divebatch_jax.nnx")
  raise AttributeError(f"module 'divebatch_jax' has no attribute {name!r}")
