"""gradient_stats(method=...): one result type, the dispatch, "auto", and the inner products
(same pass or JVP)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from divebatch_jax import gradient_stats
from divebatch_jax.stats import kernel, taps
from divebatch_jax.stats import METHODS, mean_gradient, micro_batch_sums, preferred_method


class SmallNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 4, (3, 3), strides=2, rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)
    self.out = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.norm(self.conv(x))).mean((1, 2)))


def small_net(dtype=jnp.float32, b=10):
  graphdef, params = nnx.split(SmallNet(nnx.Rngs(0)), nnx.Param)
  params = jax.tree.map(lambda p: p.astype(dtype), params)

  def loss_fn(p, batch):
    logits = nnx.merge(graphdef, p)(batch["x"].astype(dtype)).astype(jnp.float32)
    return -jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(batch["y"], 3), -1)

  k1, k2 = jax.random.split(jax.random.key(1))
  batch = {"x": jax.random.normal(k1, (b, 7, 7, 2)), "y": jax.random.randint(k2, (b,), 0, 3)}
  return loss_fn, params, batch


def elementwise_loss(w, batch):
  """No dense, convolution or lookup layer: nothing to tap."""
  return jnp.sum((jnp.tanh(batch["x"] * w) - batch["y"]) ** 2, -1)


def brute_force_inner_products(loss_fn, params, batch, mask):
  """(<g_i, ḡ>)_i over real rows from a Python loop of jax.grad, float64."""
  grad_one = jax.jit(jax.grad(lambda p, e: loss_fn(p, e)[0]))
  rows = np.stack([
      np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in jax.tree.leaves(grad_one(params, jax.tree.map(lambda x: x[i : i + 1], batch)))])
      for i in range(len(mask))
  ])[mask]
  return rows, rows @ rows.mean(0)


def all_methods(loss_fn, params, batch, mask):
  """{method: gradient_stats(..., method=method)} in one compiled call."""
  return jax.jit(lambda p, b: {m: gradient_stats(loss_fn, p, b, mask, method=m) for m in METHODS})(params, batch)


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_every_method_returns_the_same_result_type(dtype):
  loss_fn, params, batch = small_net(dtype)
  mask = jnp.arange(10) < 8
  for method, (loss, grad, record) in all_methods(loss_fn, params, batch, mask).items():
    assert loss.shape == () and loss.dtype == jnp.float32, method
    assert jax.tree.structure(grad) == jax.tree.structure(params), method
    assert all(g.dtype == dtype and g.shape == p.shape for g, p in zip(jax.tree.leaves(grad), jax.tree.leaves(params)))
    assert isinstance(record, kernel.GradientStats), method
    assert record.count.dtype == jnp.int32 and int(record.count) == 8
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(record.sum_g))
    assert record.sum_sq.dtype == jnp.float32 and record.sum_ip.dtype == jnp.float32


def test_methods_agree_with_brute_force_where_exact():
  """exact, ghost and auto give every field; microbatch gives count, sum_g and sum_ip exactly."""
  loss_fn, params, batch = small_net()
  mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], bool)
  rows, inner = brute_force_inner_products(loss_fn, params, batch, mask)
  for method, (_, grad, record) in all_methods(loss_fn, params, batch, jnp.asarray(mask)).items():
    np.testing.assert_allclose(flat(record.sum_g), rows.sum(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flat(grad), rows.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(record.sum_ip), float((inner**2).sum()), rtol=1e-5)
    if method != "microbatch":
      np.testing.assert_allclose(float(record.sum_sq), float((rows**2).sum()), rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_jvp_inner_products_equal_brute_force(chunk_size):
  """Σ_i <g_i, ḡ>² by one JVP along ḡ (per chunk) equals the per-example reference."""
  loss_fn, params, batch = small_net()
  mask = np.arange(10) != 4
  _, inner = brute_force_inner_products(loss_fn, params, batch, mask)
  _, gbar, _ = gradient_stats(loss_fn, params, batch, jnp.asarray(mask))  # float32 mean gradient
  sum_ip = jax.jit(
      lambda p, g, b: kernel._chunked(
          lambda part, part_mask: kernel.jvp_sum_ip(loss_fn, p, g, part, part_mask), b, jnp.asarray(mask), chunk_size
      )
  )(params, gbar, batch)
  np.testing.assert_allclose(float(sum_ip), float((inner**2).sum()), rtol=1e-5)


def mlp_loss(p, batch):
  return jnp.sum((jnp.tanh(batch["x"] @ p["w1"] + p["b1"]) @ p["w2"] - batch["y"]) ** 2, -1)


def tied_loss(p, batch):
  """A weight read by two products: neither can be tapped (per-example fallback)."""
  return jnp.sum((jnp.tanh(batch["x"] @ p["w"]) @ p["w"].T - batch["y"]) ** 2, -1)


def test_auto_picks_ghost_unless_fallback_leaves_hold_most_parameters():
  x = jax.random.normal(jax.random.key(2), (6, 4))
  batch = {"x": x, "y": jnp.sin(x)}
  # Dense layers (T = 1) take the Gram form, the bias is elementwise.
  params = {"w1": jnp.ones((4, 6)) / 4, "b1": jnp.zeros(6), "w2": jnp.ones((6, 4)) / 6}
  assert preferred_method(mlp_loss, params, batch) == "ghost"
  # A convolution (product or Gram form), LayerNorm scale and offset (elementwise).
  loss_fn, net_params, net_batch = small_net()
  assert preferred_method(loss_fn, net_params, net_batch) == "ghost"
  # Only elementwise leaves: (B, 4) per-example gradients, still ghost.
  w = jnp.linspace(0.5, 1.5, 4)
  assert preferred_method(elementwise_loss, w, batch) == "ghost"
  # A tied weight is all of the parameters: nothing to gain over exact.
  tied = {"w": jnp.eye(4) / 2}
  assert preferred_method(tied_loss, tied, batch) == "exact"
  for loss, p, b in ((mlp_loss, params, batch), (tied_loss, tied, batch)):
    auto = gradient_stats(loss, p, b, method="auto")[2]
    chosen = gradient_stats(loss, p, b, method=preferred_method(loss, p, b))[2]
    for a, c in zip(jax.tree.leaves(auto), jax.tree.leaves(chosen)):
      np.testing.assert_array_equal(a, c)


def test_no_real_row_gives_an_empty_record_for_every_method():
  loss_fn, params, batch = small_net()
  for method, (loss, grad, record) in all_methods(loss_fn, params, batch, jnp.zeros(10, bool)).items():
    assert float(loss) == 0.0 and int(record.count) == 0, method
    assert float(record.sum_sq) == 0.0 and float(record.sum_ip) == 0.0, method
    assert all(np.all(np.asarray(g) == 0.0) for g in jax.tree.leaves(grad)), method


def test_bad_method_and_chunk_size_name_the_argument():
  loss_fn, params, batch = small_net()
  with pytest.raises(ValueError, match="method must be one of"):
    gradient_stats(loss_fn, params, batch, method="fast")
  for method in METHODS:
    with pytest.raises(ValueError, match="chunk_size"):
      gradient_stats(loss_fn, params, batch, method=method, chunk_size=0)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_inner_products_about_a_given_direction_in_the_same_pass(chunk_size):
  """With ``ip_direction`` d (a previous step's mean gradient), sum_ip = Σ<g_i, d>² from
  the same pass for every method, equal to the per-example reference; the other fields
  are unchanged."""
  loss_fn, params, batch = small_net()
  mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], bool)
  rows, _ = brute_force_inner_products(loss_fn, params, batch, mask)
  d = jax.tree.map(lambda x: jnp.sin(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape), params)
  expected = float(((rows @ flat(d)) ** 2).sum())

  @jax.jit
  def run(p, b):
    return {
        m: gradient_stats(loss_fn, p, b, jnp.asarray(mask), method=m, ip_direction=d,
                          chunk_size=1 if m == "microbatch" else chunk_size)
        for m in METHODS
    }

  for method, (_, grad, record) in run(params, batch).items():
    np.testing.assert_allclose(float(record.sum_ip), expected, rtol=1e-5, err_msg=method)
    np.testing.assert_allclose(float(record.sum_sq), float((rows**2).sum()), rtol=1e-5, err_msg=method)
    np.testing.assert_allclose(flat(grad), rows.mean(0), rtol=1e-5, atol=1e-6)


def _flops(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"]


def test_same_pass_sum_ip_adds_no_second_forward_pass():
  """XLA's cost analysis of the compiled programs (a property of the program, not a timing):
  gradient_stats(method="ghost") with sum_ip read costs at most 1.15x the FLOPs of the
  ghost norms alone (micro_batch_sums), where the JVP pass it replaced costs over 1.3x."""
  loss_fn, params, batch = small_net(b=16)  # a strided convolution, LayerNorm, a dense head
  mask = jnp.arange(16) < 13

  def norms(p, b):
    return micro_batch_sums(loss_fn, p, b, mask, method="ghost")[0]

  def same_pass(p, b):
    return gradient_stats(loss_fn, p, b, mask, method="ghost")

  def norms_and_jvp(p, b):
    sums = norms(p, b)
    return sums, kernel.jvp_sum_ip(loss_fn, p, mean_gradient(sums), b, mask)

  base = _flops(norms, params, batch)
  assert _flops(same_pass, params, batch) <= 1.15 * base
  assert _flops(norms_and_jvp, params, batch) > 1.3 * base


def test_micro_batch_sums_with_ip_is_the_same_pass_value_or_refused():
  """micro_batch_sums(..., with_ip=True) puts Σ_i <g_i, ḡ>² about the micro-batch's own mean
  in StepSums.sum_ip (0 without it) for the per-example methods over one chunk, and refuses
  what would need a second pass with one error naming the arguments."""
  loss_fn, params, batch = small_net()
  mask = np.arange(10) != 4
  _, inner = brute_force_inner_products(loss_fn, params, batch, mask)
  for method in ("exact", "ghost", "auto"):
    sums, _ = jax.jit(lambda p, b, m=method: micro_batch_sums(loss_fn, p, b, mask, method=m, with_ip=True))(params, batch)
    np.testing.assert_allclose(float(sums.sum_ip), float((inner**2).sum()), rtol=1e-5, err_msg=method)
    assert float(micro_batch_sums(loss_fn, params, batch, mask, method=method)[0].sum_ip) == 0.0
  for kwargs in (dict(method=None), dict(method="microbatch"), dict(method="ghost", chunk_size=9)):
    with pytest.raises(ValueError, match=r"with_ip=True needs method 'exact', 'ghost' or 'auto' over one chunk \(chunk_size None or >= the batch's 10 rows\)"):
      micro_batch_sums(loss_fn, params, batch, mask, with_ip=True, **kwargs)
  with pytest.raises(ValueError, match="direction= .* or about_mean=True .*, not both"):
    taps.ghost_sums(loss_fn, params, batch, jnp.asarray(mask), direction=params, about_mean=True)
