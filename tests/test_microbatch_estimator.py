"""method="microbatch": the micro-batch estimate of Σ_i ||g_i||² against closed forms.

Linear regression, loss_i = ½(x_i·w − y_i)², has g_i = (x_i·w − y_i)·x_i, so every
reference below is computed in float64 numpy from that formula.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from divebatch_jax import gradient_stats
from divebatch_jax.stats import default_micro_batch_size


def linear_loss(w, batch):
  return 0.5 * (batch["x"] @ w - batch["y"]) ** 2


def linear_data(b=48, d=5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, d)) * rng.uniform(0.2, 3.0, size=(b, 1))  # uneven gradient sizes
  w = rng.normal(size=d)
  y = x @ rng.normal(size=d) + rng.normal(size=b)
  return x, y, w


def per_example_grads(x, y, w):
  return (x @ w - y)[:, None] * x


def microbatch(x, y, w, mask, chunk_size):
  batch = {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}
  return gradient_stats(
      linear_loss, jnp.asarray(w, jnp.float32), batch, jnp.asarray(mask), method="microbatch", chunk_size=chunk_size
  )


def estimates_over_orders(x, y, w, mask, chunk_size, orders):
  """The sum_sq estimate for each row order in ``orders`` (R, B), in one vmapped call."""

  @jax.jit
  @jax.vmap
  def estimate(order):
    return microbatch(jnp.asarray(x)[order], jnp.asarray(y)[order], w, jnp.asarray(mask)[order], chunk_size)[2].sum_sq

  return np.asarray(estimate(jnp.asarray(orders)), np.float64)


def random_orders(num_rows, num_shuffled, num_draws, seed):
  """Random orders of the first ``num_shuffled`` rows; the others stay in place."""
  rng = np.random.default_rng(seed)
  return np.stack(
      [np.concatenate([rng.permutation(num_shuffled), np.arange(num_shuffled, num_rows)]) for _ in range(num_draws)]
  )


@pytest.mark.parametrize(
    "padding, chunk_size",
    [("none", 6), ("none", 16), ("trailing", 6), ("scattered", 8)],
)
def test_unbiased_over_random_orders(padding, chunk_size):
  """Mean over 600 random row orders within 3 standard errors of the exact Σ_i ||g_i||²."""
  x, y, w = linear_data()
  b = len(x)
  mask = np.ones(b, bool)
  shuffled = b
  if padding == "trailing":  # a padded bucket: real rows first, only their order is random
    mask[37:] = False
    shuffled = 37
  elif padding == "scattered":  # padding moves with the rows: uneven micro-batch counts
    mask[np.random.default_rng(1).choice(b, 13, replace=False)] = False
  draws = estimates_over_orders(x, y, w, mask, chunk_size, random_orders(b, shuffled, 600, seed=2))
  g = per_example_grads(x, y, w)[mask]
  exact = float((g**2).sum())
  standard_error = draws.std(ddof=1) / np.sqrt(len(draws))
  assert standard_error > 1e-3 * exact  # the estimate does vary, so the test has power
  assert abs(draws.mean() - exact) < 3 * standard_error, (draws.mean(), exact, standard_error)


def test_formula_with_uneven_counts_equals_numpy():
  """Row i in micro-batch i mod K; micro-batches weighted by their real counts."""
  x, y, w = linear_data(b=20, seed=4)
  mask = np.ones(20, bool)
  mask[[1, 2, 6, 11, 15, 16, 17, 19]] = False
  chunk_size = 5  # K = 4 micro-batches: rows {0, 4, 8, ...}, {1, 5, 9, ...}, ...
  g = per_example_grads(x, y, w) * mask[:, None]
  k = 4
  counts = np.array([mask[j::k].sum() for j in range(k)])
  means = np.stack([g[j::k].sum(0) / max(c, 1) for j, c in zip(range(k), counts)])
  n = mask.sum()
  gbar = g.sum(0) / n
  trace = sum(c * ((m - gbar) ** 2).sum() for c, m in zip(counts, means)) / ((counts > 0).sum() - 1)
  expected = n * (gbar**2).sum() + (n - 1) * trace

  loss, grad, stats = microbatch(x, y, w, mask, chunk_size)
  np.testing.assert_allclose(float(stats.sum_sq), expected, rtol=1e-5)
  # count, sum_g and sum_ip (by the JVP) are exact, not estimates.
  assert int(stats.count) == n
  np.testing.assert_allclose(stats.sum_g, g.sum(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad, gbar, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(stats.sum_ip), float(((g @ gbar) ** 2).sum()), rtol=1e-5)
  np.testing.assert_allclose(float(loss), np.mean(0.5 * (x @ w - y)[mask] ** 2), rtol=1e-5)


def test_single_example_micro_batches_are_exact():
  x, y, w = linear_data(b=12, seed=5)
  mask = np.arange(12) < 10
  g = per_example_grads(x, y, w)[mask]
  _, _, stats = microbatch(x, y, w, mask, chunk_size=1)
  np.testing.assert_allclose(float(stats.sum_sq), float((g**2).sum()), rtol=1e-5)


def test_fewer_than_two_nonempty_micro_batches():
  """With K' < 2 the trace is taken as 0: exact for one real row, N·||ḡ||² otherwise."""
  x, y, w = linear_data(b=16, seed=6)
  g = per_example_grads(x, y, w)
  one = np.zeros(16, bool)
  one[5] = True
  _, _, stats = microbatch(x, y, w, one, chunk_size=4)
  np.testing.assert_allclose(float(stats.sum_sq), float((g[5] ** 2).sum()), rtol=1e-5)
  same_micro_batch = np.zeros(16, bool)
  same_micro_batch[[1, 5, 9]] = True  # K = 4: rows 1, 5, 9 all in micro-batch 1
  _, _, stats = microbatch(x, y, w, same_micro_batch, chunk_size=4)
  gbar = g[[1, 5, 9]].mean(0)
  np.testing.assert_allclose(float(stats.sum_sq), 3 * float((gbar**2).sum()), rtol=1e-5)
  empty = np.zeros(16, bool)
  _, grad, stats = microbatch(x, y, w, empty, chunk_size=4)
  assert int(stats.count) == 0 and float(stats.sum_sq) == 0.0 and float(stats.sum_ip) == 0.0
  assert np.all(np.asarray(grad) == 0.0)


def test_default_micro_batch_size_and_bad_chunk_size():
  assert default_micro_batch_size(128) == 16
  assert default_micro_batch_size(5) == 1
  x, y, w = linear_data(b=16)
  g = per_example_grads(x, y, w)
  default = microbatch(x, y, w, np.ones(16, bool), chunk_size=None)[2]
  explicit = microbatch(x, y, w, np.ones(16, bool), chunk_size=2)[2]
  np.testing.assert_allclose(float(default.sum_sq), float(explicit.sum_sq), rtol=1e-6)
  assert abs(float(default.sum_sq) - float((g**2).sum())) > 1e-3  # an estimate, not the exact value
  for bad in (16, 40):
    with pytest.raises(ValueError, match="chunk_size"):
      microbatch(x, y, w, np.ones(16, bool), chunk_size=bad)
