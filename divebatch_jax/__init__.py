"""divebatch_jax: adaptive batch-size training (DiveBatch and peers) for JAX.

Three parts:
  * :mod:`divebatch_jax.stats` -- per-example gradient statistics on device
    (``gradient_stats``, ``diversity``, norm-test variances, noise scale);
  * :mod:`divebatch_jax.transform` -- ``adaptive_batch``, an Optax gradient
    transformation that decides the next batch size on device;
  * :mod:`divebatch_jax.data` -- a host-side pipeline that re-batches to padded
    static shapes so a new batch size does not recompile.
"""

from divebatch_jax.stats import (
    GradientStats,
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

__version__ = "0.1.0"

from divebatch_jax import data, policies
from divebatch_jax.accumulate import accumulate_gradients
from divebatch_jax.compilations import CompileCounter
from divebatch_jax.lr_rules import LR_RULES
from divebatch_jax.policies import suggest_delta
from divebatch_jax.transform import (
    AdaptiveBatchState,
    adaptive_batch,
    batch_state_summary,
    current_batch_size,
    find_state,
)
