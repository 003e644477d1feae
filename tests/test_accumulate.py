"""accumulate_gradients equals one pass over the unsplit real rows (uneven real counts)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from divebatch_jax.stats import accumulate_gradients
from divebatch_jax.stats import gradient_stats

K, M = 4, 8
COUNTS = (8, 3, 0, 5)  # real rows per micro-batch: uneven, one all padding


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  """GPUs multiply float32 in TF32 by default (~1e-4 relative); compare at 1e-6 in float32."""
  with jax.default_matmul_precision("float32"):
    yield


def _mlp_loss(params, batch):
  hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  logits = hidden @ params["w2"]
  return -jax.nn.log_softmax(logits)[jnp.arange(logits.shape[0]), batch["y"]]


def _linear_loss(w, batch):
  return 0.5 * (batch["x"] @ w - batch["y"]) ** 2


def _layout(rows, counts=COUNTS, seed=0):
  """Scatter ``rows`` into (K, M) micro-batches with ``counts`` real rows; junk elsewhere."""
  rng = np.random.default_rng(seed)
  mask = np.arange(M)[None, :] < np.array(counts)[:, None]
  out = {}
  for name, value in rows.items():
    junk = rng.normal(size=(K, M) + value.shape[1:]) * 100  # padded rows must not matter
    laid = junk.astype(value.dtype)
    laid[mask] = value
    out[name] = laid
  return out, mask


def _mlp_case():
  rng = np.random.default_rng(1)
  n = sum(COUNTS)
  rows = {"x": rng.normal(size=(n, 5)).astype(np.float32), "y": rng.integers(0, 3, n).astype(np.int32)}
  params = {
      "w1": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32),
      "b1": jnp.asarray(rng.normal(size=(7,)), jnp.float32),
      "w2": jnp.asarray(rng.normal(size=(7, 3)), jnp.float32),
  }
  return rows, params


def _assert_tree_close(actual, expected, rtol=1e-6):
  """Same tree structure and shapes (chex), then each leaf within rtol of its own largest value."""
  chex.assert_trees_all_equal_structs(actual, expected)
  chex.assert_trees_all_equal_shapes(actual, expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * np.abs(e).max())


def test_plain_path_equals_one_pass_over_real_rows():
  rows, params = _mlp_case()
  batch, mask = _layout(rows)
  step = jax.jit(accumulate_gradients, static_argnums=0)
  loss, grad, stats = step(_mlp_loss, params, batch, mask)
  assert stats is None

  def mean_loss(p):
    return jnp.mean(_mlp_loss(p, {k: jnp.asarray(v) for k, v in rows.items()}))

  ref_loss, ref_grad = jax.jit(jax.value_and_grad(mean_loss))(params)
  _assert_tree_close(loss, ref_loss)
  _assert_tree_close(grad, ref_grad)
  # Averaging the micro-batches' means instead would weight rows unequally.
  row_weights = np.concatenate([np.full(c, 1 / c) for c in COUNTS if c]) / sum(c > 0 for c in COUNTS)

  def naive_loss(p):
    return jnp.sum(row_weights * _mlp_loss(p, {k: jnp.asarray(v) for k, v in rows.items()}))

  naive = jax.jit(jax.grad(naive_loss))(params)
  assert not np.allclose(naive["w2"], ref_grad["w2"], rtol=1e-3)


def test_plain_path_matches_float64_closed_form():
  rng = np.random.default_rng(2)
  n = sum(COUNTS)
  x, y, w = rng.normal(size=(n, 6)), rng.normal(size=n), rng.normal(size=6)
  batch, mask = _layout({"x": x.astype(np.float32), "y": y.astype(np.float32)})
  loss, grad, _ = accumulate_gradients(_linear_loss, jnp.asarray(w, jnp.float32), batch, mask)
  residual = x @ w - y
  assert float(loss) == pytest.approx(0.5 * np.mean(residual**2), rel=1e-5)
  np.testing.assert_allclose(grad, x.T @ residual / n, rtol=1e-5, atol=1e-5)


def test_stats_path_equals_gradient_stats_on_unsplit_rows():
  rows, params = _mlp_case()
  batch, mask = _layout(rows)
  step = jax.jit(accumulate_gradients, static_argnums=0, static_argnames=("stats_method", "chunk_size"))
  loss, grad, stats = step(_mlp_loss, params, batch, mask, stats_method="exact")
  ref_loss, ref_grad, ref_stats = jax.jit(gradient_stats, static_argnums=0)(
      _mlp_loss, params, {k: jnp.asarray(v) for k, v in rows.items()}
  )
  assert int(stats.count) == sum(COUNTS)
  _assert_tree_close(loss, ref_loss)
  _assert_tree_close(grad, ref_grad)
  _assert_tree_close(stats.sum_g, ref_stats.sum_g)
  _assert_tree_close(stats.sum_sq, ref_stats.sum_sq)
  _assert_tree_close(stats.sum_ip, ref_stats.sum_ip, rtol=1e-5)  # about the step's mean, not per micro-batch


def test_stats_path_matches_float64_brute_force():
  rng = np.random.default_rng(3)
  n = sum(COUNTS)
  x, y, w = rng.normal(size=(n, 6)), rng.normal(size=n), rng.normal(size=6)
  batch, mask = _layout({"x": x.astype(np.float32), "y": y.astype(np.float32)})
  _, _, stats = accumulate_gradients(
      _linear_loss, jnp.asarray(w, jnp.float32), batch, mask, stats_method="exact", chunk_size=3
  )
  per_example = (x @ w - y)[:, None] * x  # g_i in float64
  mean = per_example.mean(axis=0)
  assert float(stats.sum_sq) == pytest.approx(np.sum(per_example**2), rel=1e-5)
  np.testing.assert_allclose(stats.sum_g, per_example.sum(axis=0), rtol=1e-5, atol=1e-5)
  assert float(stats.sum_ip) == pytest.approx(np.sum((per_example @ mean) ** 2), rel=1e-5)


def test_no_real_rows_gives_zeros():
  rows, params = _mlp_case()
  batch, _ = _layout(rows)
  loss, grad, _ = accumulate_gradients(_mlp_loss, params, batch, np.zeros((K, M), bool))
  assert float(loss) == 0 and all(not np.any(g) for g in jax.tree.leaves(grad))


def test_layout_errors_name_the_shapes():
  rows, params = _mlp_case()
  batch, mask = _layout(rows)
  with pytest.raises(ValueError, match=r"mask must have shape \(K, m\)"):
    accumulate_gradients(_mlp_loss, params, batch, mask.reshape(-1))
  with pytest.raises(ValueError, match=r"leading shape \(K, m\) = \(2, 16\)"):
    accumulate_gradients(_mlp_loss, params, batch, mask.reshape(2, 16))
