"""The exact statistics kernel against independent references (float64 numpy, brute force)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import divebatch_jax as dbj
from divebatch_jax import stats as stats_lib
from divebatch_jax.stats import kernel


def _reference_sums(per_example_grads: np.ndarray) -> dict:
  """float64 sums over rows of a (B, P) array of per-example gradients."""
  g = np.asarray(per_example_grads, np.float64)
  sum_g = g.sum(0)
  gbar = sum_g / len(g)
  return {
      "count": len(g),
      "sum_g": sum_g,
      "sum_sq": float((g**2).sum()),
      "sum_ip": float(((g @ gbar) ** 2).sum()),
  }


def _assert_matches(stats, ref, rtol=1e-5):
  assert int(stats.count) == ref["count"]
  sum_g = np.concatenate([np.ravel(x) for x in jax.tree.leaves(stats.sum_g)])
  np.testing.assert_allclose(sum_g, ref["sum_g"], rtol=rtol, atol=1e-6 * np.abs(ref["sum_g"]).max())
  np.testing.assert_allclose(float(stats.sum_sq), ref["sum_sq"], rtol=rtol)
  np.testing.assert_allclose(float(stats.sum_ip), ref["sum_ip"], rtol=rtol)


def _linear_data(seed=0, b=40, d=6):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, d))
  y = x @ rng.normal(size=d) + 0.3 * rng.normal(size=b)
  w = rng.normal(size=d)
  return x, y, w


def linear_loss(w, batch):
  return 0.5 * (batch["x"] @ w - batch["y"]) ** 2


def logistic_loss(w, batch):
  z = batch["x"] @ w
  return jnp.logaddexp(0.0, z) - batch["y"] * z


def test_linear_regression_closed_form():
  x, y, w = _linear_data()
  # g_i = (x_i·w − y_i) x_i
  ref = _reference_sums((x @ w - y)[:, None] * x)
  batch = {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}
  loss, grad, stats = dbj.gradient_stats(linear_loss, jnp.asarray(w, jnp.float32), batch)
  _assert_matches(stats, ref)
  np.testing.assert_allclose(grad, ref["sum_g"] / len(x), rtol=1e-5)
  np.testing.assert_allclose(loss, np.mean(0.5 * (x @ w - y) ** 2), rtol=1e-5)
  np.testing.assert_allclose(
      dbj.diversity(stats), ref["sum_sq"] / np.sum(ref["sum_g"] ** 2), rtol=1e-5
  )


def test_logistic_regression_closed_form():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(50, 5))
  y = (rng.random(50) < 0.5).astype(np.float64)
  w = 0.5 * rng.normal(size=5)
  # g_i = (σ(x_i·w) − y_i) x_i
  ref = _reference_sums((1 / (1 + np.exp(-(x @ w))) - y)[:, None] * x)
  batch = {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}
  _, _, stats = dbj.gradient_stats(logistic_loss, jnp.asarray(w, jnp.float32), batch)
  _assert_matches(stats, ref)


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(5, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


class CNN(nnx.Module):

  def __init__(self, rngs):
    self.c1 = nnx.Conv(1, 4, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
    self.c2 = nnx.Conv(4, 6, (3, 3), padding="VALID", rngs=rngs)
    self.out = nnx.Linear(6 * 2 * 2, 3, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.c1(x))
    h = jax.nn.relu(self.c2(h))
    return self.out(h.reshape(h.shape[0], -1))


def _nnx_loss(model):
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(p, batch):
    logits = nnx.merge(graphdef, p)(batch["x"])
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1)[:, 0]

  return loss_fn, params


def _brute_force(loss_fn, params, batch):
  """One jax.grad per example, flattened, as float64 numpy."""
  b = kernel.batch_size_of(batch)
  rows = []
  for i in range(b):
    one = jax.tree.map(lambda x: x[i : i + 1], batch)
    g = jax.grad(lambda p: loss_fn(p, one)[0])(params)
    rows.append(np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(g)]))
  return np.stack(rows)


@pytest.mark.parametrize(
    "module,shape", [(MLP, (12, 5)), (CNN, (10, 8, 8, 1))], ids=["mlp", "cnn"]
)
def test_nnx_models_against_brute_force(module, shape):
  loss_fn, params = _nnx_loss(module(nnx.Rngs(0)))
  rng = np.random.default_rng(2)
  batch = {
      "x": jnp.asarray(rng.normal(size=shape), jnp.float32),
      "y": jnp.asarray(rng.integers(0, 3, size=shape[0]), jnp.int32),
  }
  _, _, stats = jax.jit(lambda p, b: dbj.gradient_stats(loss_fn, p, b))(params, batch)
  _assert_matches(stats, _reference_sums(_brute_force(loss_fn, params, batch)), rtol=2e-5)


def test_padded_and_masked_equals_unpadded():
  x, y, w = _linear_data(b=30)
  real = {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}
  rng = np.random.default_rng(3)
  junk = {"x": jnp.asarray(1e3 * rng.normal(size=(34, 6)), jnp.float32), "y": jnp.full((34,), jnp.nan)}
  padded = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), real, junk)
  mask = jnp.arange(64) < 30
  wj = jnp.asarray(w, jnp.float32)
  l1, g1, s1 = dbj.gradient_stats(linear_loss, wj, real)
  l2, g2, s2 = dbj.gradient_stats(linear_loss, wj, padded, mask)
  assert int(s2.count) == 30
  for a, b in [(l1, l2), (g1, g2), (s1.sum_sq, s2.sum_sq), (s1.sum_ip, s2.sum_ip), (s1.sum_g, s2.sum_g)]:
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_records_over_3_17_64_rows_equal_one_pass_over_84():
  x, y, w = _linear_data(b=84)
  wj = jnp.asarray(w, jnp.float32)
  batch = {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}
  parts = []
  for lo, hi in [(0, 3), (3, 20), (20, 84)]:
    parts.append(dbj.gradient_stats(linear_loss, wj, jax.tree.map(lambda a: a[lo:hi], batch))[2])
  combined = dbj.combine_stats(*parts)
  _, _, whole = dbj.gradient_stats(linear_loss, wj, batch)
  assert int(combined.count) == 84
  np.testing.assert_allclose(combined.sum_g, whole.sum_g, rtol=1e-6)
  np.testing.assert_allclose(combined.sum_sq, whole.sum_sq, rtol=1e-6)
  np.testing.assert_allclose(dbj.diversity(combined), dbj.diversity(whole), rtol=1e-6)
  # And the empty record is the identity.
  again = dbj.combine_stats(dbj.empty_stats(wj), combined)
  np.testing.assert_array_equal(again.sum_sq, combined.sum_sq)


@pytest.mark.parametrize("chunk", [1, 7, 16, 100])
def test_chunked_equals_unchunked(chunk):
  x, y, w = _linear_data(b=45)
  wj = jnp.asarray(w, jnp.float32)
  batch = {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}
  mask = jnp.arange(45) % 5 != 0
  ref = dbj.gradient_stats(linear_loss, wj, batch, mask)
  got = dbj.gradient_stats(linear_loss, wj, batch, mask, chunk_size=chunk)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, rtol=2e-6)


def test_derived_quantities_against_numpy():
  x, y, w = _linear_data(b=25)
  g = (x @ w - y)[:, None] * x
  b = len(g)
  gbar = g.mean(0)
  ip = g @ gbar
  stats = dbj.gradient_stats(
      linear_loss, jnp.asarray(w, jnp.float32),
      {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)},
  )[2]
  var1 = ((g - gbar) ** 2).sum() / (b - 1)
  np.testing.assert_allclose(dbj.norm_test_variance(stats), var1, rtol=1e-4)
  var_ip = ((ip - gbar @ gbar) ** 2).sum() / (b - 1)
  np.testing.assert_allclose(dbj.inner_product_variance(stats), var_ip, rtol=1e-3)
  var_o = ((g**2).sum(1) - ip**2 / (gbar @ gbar)).sum() / (b - 1)
  np.testing.assert_allclose(dbj.orthogonality_variance(stats), var_o, rtol=1e-4)
  trace, grad_sq = dbj.noise_components(stats)
  np.testing.assert_allclose(trace, var1, rtol=1e-4)
  np.testing.assert_allclose(grad_sq, gbar @ gbar - var1 / b, rtol=1e-4)
  np.testing.assert_allclose(dbj.noise_scale(stats), var1 / (gbar @ gbar - var1 / b), rtol=1e-4)


def test_population_identity_n_delta_equals_one_plus_b_simple():
  # Over all n examples at one point: n·Δ = 1 + tr Σ/|G|² with population moments.
  x, y, w = _linear_data(b=200)
  g = (x @ w - y)[:, None] * x
  n = len(g)
  gbar = g.mean(0)
  b_simple = (((g - gbar) ** 2).sum() / n) / (gbar @ gbar)
  stats = dbj.gradient_stats(
      linear_loss, jnp.asarray(w, jnp.float32),
      {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)},
  )[2]
  np.testing.assert_allclose(n * float(dbj.diversity(stats)), 1 + b_simple, rtol=1e-4)


def test_degenerate_records_are_documented_values():
  w = jnp.zeros(3)
  empty = dbj.empty_stats(w)
  assert float(dbj.diversity(empty)) == np.inf  # 0/0 -> +inf, never NaN
  assert np.isnan(float(dbj.norm_test_variance(empty)))
  # Gradients that cancel exactly: Σg = 0 but Σ||g||² > 0 -> +inf.
  cancel = stats_lib.GradientStats(
      jnp.int32(2), jnp.zeros(3), jnp.float32(2.0), jnp.float32(0.0)
  )
  assert float(dbj.diversity(cancel)) == np.inf
  # A batch with no real row: zero loss and gradient, empty record.
  x, y, _ = _linear_data(b=4, d=3)
  batch = {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}
  loss, grad, stats = dbj.gradient_stats(linear_loss, w, batch, jnp.zeros(4, bool))
  assert float(loss) == 0.0 and int(stats.count) == 0
  np.testing.assert_array_equal(grad, np.zeros(3))


def test_bf16_params_keep_dtype_and_sum_in_float32():
  x, y, w = _linear_data(b=16)
  wb = jnp.asarray(w, jnp.bfloat16)
  batch = {"x": jnp.asarray(x, jnp.bfloat16), "y": jnp.asarray(y, jnp.bfloat16)}
  _, grad, stats = dbj.gradient_stats(linear_loss, wb, batch)
  assert grad.dtype == jnp.bfloat16
  assert stats.sum_g.dtype == jnp.float32 and stats.sum_sq.dtype == jnp.float32


def test_bad_arguments_name_the_argument():
  x, y, w = _linear_data(b=8)
  batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
  with pytest.raises(ValueError, match="method"):
    dbj.gradient_stats(linear_loss, jnp.asarray(w), batch, method="magic")
  with pytest.raises(ValueError, match="chunk_size"):
    dbj.gradient_stats(linear_loss, jnp.asarray(w), batch, chunk_size=0)
  with pytest.raises(ValueError, match="mask"):
    dbj.gradient_stats(linear_loss, jnp.asarray(w), batch, jnp.ones(5, bool))
  with pytest.raises(ValueError, match="leading dimension"):
    dbj.gradient_stats(linear_loss, jnp.asarray(w), {"x": batch["x"], "y": batch["y"][:3]})
