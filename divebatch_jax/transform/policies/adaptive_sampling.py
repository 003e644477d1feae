"""Adaptive-sampling tests with AdAdaGrad's monotone rule (Lau, Liu, Kolar 2024).

On the current batch B (size |B|, mean ḡ), every ``every`` steps:

* norm test (Byrd et al. 2012): Var₁ = (Σ||g_i||² − |B|·||ḡ||²)/(|B| − 1);
  passes if Var₁/|B| ≤ η²||ḡ||², else asks for ``⌈Var₁ / (η²||ḡ||²)⌉``;
* inner-product test (Bollapragada et al. 2018): Var_ip = Σ(<g_i,ḡ> − ||ḡ||²)²/(|B|−1);
  asks for ``⌈Var_ip / (θ²||ḡ||⁴)⌉``; with ``nu`` given (augmented test) the
  larger of that and the orthogonality request ``⌈Var_o / (ν²||ḡ||²)⌉``,
  Var_o = Σ(||g_i||² − <g_i,ḡ>²/||ḡ||²)/(|B|−1).

A request at or below |B| means the test passed. The rule is monotone:
``b ← min(max(b, request), b_max)``. A NaN statistic (fewer than two real
examples) leaves b unchanged; ḡ = 0 asks for b_max.

Under Adam (Lau et al., PMLR 280, 2025, who grow a language model's batch by the norm
test under AdamW): the test on every ``every``-th step's own batch, the monotone rule,
and the learning rate left on its schedule (``adaptive_batch(..., lr_rule="none")``, the
default): a batch change alters the gradient noise, never the Adam step. The CLI:
``--method norm-test --optimizer adamw --test-every k``.

Example::

    >>> from divebatch_jax import policies
    >>> policies.inner_product_test(theta=0.5, nu=1.0, max_batch_size=4096).name
    'inner_product_test'
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from divebatch_jax import stats as stats_lib
from divebatch_jax.stats import records
from divebatch_jax.transform.policies import base


class TestState(NamedTuple):
  pass


def _always(epoch: int) -> bool:
  del epoch
  return True


def _ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """numerator/denominator with x/0 = +inf for x > 0, NaN kept."""
  safe = jnp.where(denominator > 0, denominator, 1.0)
  return jnp.where(denominator > 0, numerator / safe, jnp.where(numerator > 0, jnp.inf, 0.0))


def norm_test_request(stats: stats_lib.GradientStats, eta: float) -> jax.Array:
  """⌈Var₁ / (η²||ḡ||²)⌉ as float32 (NaN if undefined, +inf if ḡ = 0)."""
  gbar_sq = records.tree_sq_norm(stats_lib.mean_gradient(stats))
  return jnp.ceil(_ratio(stats_lib.norm_test_variance(stats), eta**2 * gbar_sq))


def inner_product_request(
    stats: stats_lib.GradientStats, theta: float, nu: float | None = None
) -> jax.Array:
  """⌈Var_ip/(θ²||ḡ||⁴)⌉, or the max with ⌈Var_o/(ν²||ḡ||²)⌉ when ``nu`` is given."""
  gbar_sq = records.tree_sq_norm(stats_lib.mean_gradient(stats))
  request = _ratio(stats_lib.inner_product_variance(stats), theta**2 * gbar_sq**2)
  if nu is not None:
    orth = _ratio(stats_lib.orthogonality_variance(stats), nu**2 * gbar_sq)
    request = jnp.maximum(request, jnp.where(gbar_sq > 0, orth, jnp.inf))
  return jnp.ceil(request)


def _test_policy(name: str, request_fn, max_batch_size: int, every: int) -> base.BatchSizePolicy:
  def init(params) -> TestState:
    del params
    return TestState()

  def update(info: base.PolicyInfo, state: TestState):
    if not info.has_stats:
      keep = base.PolicyDecision(info.batch_size, jnp.ones((), jnp.float32), jnp.float32(base.NAN))
      return keep, state
    request = request_fn(info.stats).astype(jnp.float32)
    decide = base.every_n_steps(info, every) & ~jnp.isnan(request)
    grown = base.grow_towards(request, info.batch_size, max_batch_size)
    new_b = jnp.where(decide, grown, info.batch_size)
    statistic = jnp.where(decide, request, jnp.nan)
    return base.PolicyDecision(new_b, jnp.ones((), jnp.float32), statistic, statistic), state

  return base.BatchSizePolicy(
      name, init, update, _always, decision_steps=every,
      needs_inner_products=name == "inner_product_test", max_batch_size=max_batch_size,
  )


def norm_test(eta: float, max_batch_size: int, every: int = 1) -> base.BatchSizePolicy:
  """The norm test with AdAdaGrad's monotone rule.

  Args:
    eta: η > 0; smaller η demands more accurate gradients (larger batches).
    max_batch_size: b_max.
    every: test every ``every`` steps (statistics are needed in every epoch).
  """
  eta = base.check_positive_float("eta", eta)
  max_batch_size = base.check_positive_int("max_batch_size", max_batch_size)
  every = base.check_positive_int("every", every)
  return _test_policy("norm_test", lambda s: norm_test_request(s, eta), max_batch_size, every)


def inner_product_test(
    theta: float, nu: float | None = None, *, max_batch_size: int, every: int = 1
) -> base.BatchSizePolicy:
  """The (augmented, if ``nu`` is given) inner-product test with the monotone rule.

  Args:
    theta: θ > 0 of the inner-product test (0.5 in AdAdaGrad's scripts).
    nu: ν > 0 of the orthogonality test (1.0 in their scripts), or None.
    max_batch_size: b_max.
    every: test every ``every`` steps.
  """
  theta = base.check_positive_float("theta", theta)
  if nu is not None:
    nu = base.check_positive_float("nu", nu)
  max_batch_size = base.check_positive_int("max_batch_size", max_batch_size)
  every = base.check_positive_int("every", every)
  return _test_policy(
      "inner_product_test", lambda s: inner_product_request(s, theta, nu), max_batch_size, every
  )
