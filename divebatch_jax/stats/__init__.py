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
    batch_size_of,
    check_per_example_loss,
    default_micro_batch_size,
    gradient_stats,
    jvp_sum_ip,
    masked_loss_and_grad,
    mean_loss_and_grad,
    micro_batch_sums,
    preferred_method,
    record_of,
    resolve_mask,
)
from divebatch_jax.stats.microbatch import (
    StepSums,
    add_sums,
    estimated_sum_sq,
    sum_micro_batches,
    zero_sums,
)
from divebatch_jax.stats.records import (
    GradientStats,
    PyTree,
    combine_stats,
    diversity,
    empty_stats,
    inner_product_variance,
    mean_gradient,
    noise_components,
    noise_scale,
    norm_test_variance,
    orthogonality_variance,
    safe_count,
    tree_sq_norm,
)
