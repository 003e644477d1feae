"""The per-example statistics kernel (the first part of the card).

* :mod:`.records` -- :class:`GradientStats` (``count``, ``sum_g``, ``sum_sq``,
  ``sum_ip`` over real rows), :func:`combine_stats`, and what the rules read:
  :func:`diversity`, the norm-test / inner-product / orthogonality variances,
  :func:`noise_components`, :func:`noise_scale`.
* :mod:`.kernel` -- :func:`gradient_stats`: mean loss, mean gradient and a record
  over one masked batch, by ``method`` ``"exact"``, ``"ghost"``, ``"microbatch"``
  or ``"auto"``.
* :mod:`.taps` -- the fast path of ``"ghost"``: per-layer norms from each layer's
  input and output cotangent, chosen per layer by a cost model.
* :mod:`.microbatch` -- the one micro-batch summation every step uses (plain,
  instrumented, evaluation): sums weighted by real counts, divided once.

This package imports jax only.
"""

from divebatch_jax.stats.kernel import (
    METHODS,
    PER_EXAMPLE_METHODS,
    AuxLossFn,
    LossFn,
    accumulate_gradients,
    default_micro_batch_size,
    gradient_stats,
    masked_loss_and_grad,
    mean_loss_and_grad,
    micro_batch_sums,
    preferred_method,
)
from divebatch_jax.stats.microbatch import StepSums, sum_micro_batches
from divebatch_jax.stats.records import (
    GradientStats,
    combine_stats,
    diversity,
    empty_stats,
    inner_product_variance,
    mean_gradient,
    noise_components,
    noise_scale,
    norm_test_variance,
    orthogonality_variance,
)

__all__ = [
    "METHODS",
    "PER_EXAMPLE_METHODS",
    "AuxLossFn",
    "GradientStats",
    "LossFn",
    "StepSums",
    "accumulate_gradients",
    "combine_stats",
    "default_micro_batch_size",
    "diversity",
    "empty_stats",
    "gradient_stats",
    "inner_product_variance",
    "masked_loss_and_grad",
    "mean_gradient",
    "mean_loss_and_grad",
    "micro_batch_sums",
    "noise_components",
    "noise_scale",
    "norm_test_variance",
    "orthogonality_variance",
    "preferred_method",
    "sum_micro_batches",
]
