"""``divebatch_jax.nnx.value_and_grad`` against ``nnx.value_and_grad`` and brute-force loops."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx

import divebatch_jax as dbj

B = 8


class MLP(nnx.Module):
  def __init__(self, rngs, *, dropout=0.0, batch_norm=False):
    self.hidden = nnx.Linear(5, 6, rngs=rngs)
    self.norm = nnx.BatchNorm(6, rngs=rngs) if batch_norm else None
    self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None
    self.out = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    h = self.hidden(x)
    h = self.norm(h) if self.norm is not None else h
    h = nnx.tanh(h)
    h = self.drop(h) if self.drop is not None else h
    return self.out(h)


def _loss(model, batch):
  logits = model(batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]), logits


def _batch(seed=0, b=B):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.normal(size=(b, 5)), jnp.float32), "y": jnp.asarray(rng.integers(0, 3, b))}


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _reference_sums(per_example_grads, mask):
  """(count, sum_g, Σ||g_i||², Σ<g_i, ḡ>²) from a (B, P) float64 matrix of per-example gradients."""
  g = per_example_grads[mask]
  mean = g.mean(axis=0)
  return len(g), g.sum(axis=0), float(np.sum(g * g)), float(np.sum((g @ mean) ** 2))


def _assert_stats(stats, reference):
  count, sum_g, sum_sq, sum_ip = reference
  assert int(stats.count) == count
  np.testing.assert_allclose(_flat(stats.sum_g), sum_g, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(stats.sum_sq), sum_sq, rtol=1e-5)
  np.testing.assert_allclose(float(stats.sum_ip), sum_ip, rtol=1e-5)


@pytest.mark.parametrize("method", ["auto", "exact", "ghost"])
def test_stats_equal_a_per_example_loop_on_a_plain_model(method):
  model, batch = MLP(nnx.Rngs(0)), _batch()
  mask = np.array([True] * 6 + [False] * 2)
  (loss, logits), grads, stats = dbj.nnx.value_and_grad(_loss, has_aux=True, method=method)(
      model, batch, jnp.asarray(mask))
  rows = []
  for i in range(B):  # brute force: one example at a time through nnx.grad
    one = jax.tree.map(lambda a: a[i:i + 1], batch)
    rows.append(_flat(nnx.grad(lambda m: _loss(m, one)[0][0])(model)))
  per_example = np.stack(rows)
  _assert_stats(stats, _reference_sums(per_example, mask))
  np.testing.assert_allclose(_flat(grads), per_example[mask].mean(axis=0), rtol=1e-5, atol=1e-7)
  expected_loss = np.mean(np.asarray(_loss(model, batch)[0])[mask])
  np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-6)
  np.testing.assert_allclose(logits, model(batch["x"]), rtol=1e-6)


def test_dropout_draws_from_the_model_rngs_like_nnx_value_and_grad():
  model, twin, batch = MLP(nnx.Rngs(0), dropout=0.5), MLP(nnx.Rngs(0), dropout=0.5), _batch(1)
  grad_fn = dbj.nnx.value_and_grad(_loss, has_aux=True)
  (loss, _), grads, stats = grad_fn(model, batch)
  (ref_loss, _), ref_grads = nnx.value_and_grad(lambda m: jax.tree.map(jnp.mean, _loss(m, batch)), has_aux=True)(twin)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  np.testing.assert_allclose(_flat(grads), _flat(ref_grads), rtol=1e-5, atol=1e-7)
  assert int(model.drop.rngs.count[...]) == int(twin.drop.rngs.count[...]) == 1
  # the record: each row alone on the streams folded with its index (a loop, one nnx.grad per row)
  fresh = MLP(nnx.Rngs(0), dropout=0.5)
  graphdef, params, rest = nnx.split(fresh, nnx.Param, ...)
  rows = []
  for i in range(B):
    folded = jax.tree.map(
        lambda v: v.replace(jax.random.fold_in(v[...], i)) if isinstance(v, nnx.RngKey) else v,
        rest, is_leaf=lambda v: isinstance(v, nnx.Variable))
    one = jax.tree.map(lambda a: a[i:i + 1], batch)
    rows.append(_flat(jax.grad(lambda p: _loss(nnx.merge(graphdef, p, folded, copy=True), one)[0][0])(params)))
  per_example = np.stack(rows)
  _assert_stats(stats, _reference_sums(per_example, np.ones(B, bool)))
  assert len({tuple(r) for r in np.round(per_example, 6)}) == B
  (second, _), _, _ = grad_fn(model, batch)  # the stream advanced: another mask
  assert int(model.drop.rngs.count[...]) == 2 and float(second) != float(loss)


def test_batch_norm_gets_the_micro_batch_estimator_and_nnx_grads():
  model, twin, batch = MLP(nnx.Rngs(0), batch_norm=True), MLP(nnx.Rngs(0), batch_norm=True), _batch(2)
  assert dbj.nnx.resolve_method(model, "auto") == "microbatch"
  for method in ("exact", "ghost"):
    with pytest.raises(ValueError, match="BatchNorm in train mode.*method='microbatch'"):
      dbj.nnx.value_and_grad(_loss, has_aux=True, method=method)(model, batch)
  loss_and_aux, grads, stats = dbj.nnx.value_and_grad(_loss, has_aux=True)(model, batch)
  ref, ref_grads = nnx.value_and_grad(lambda m: jax.tree.map(jnp.mean, _loss(m, batch)), has_aux=True)(twin)
  np.testing.assert_allclose(float(loss_and_aux[0]), float(ref[0]), rtol=1e-6)
  np.testing.assert_allclose(_flat(grads), _flat(ref_grads), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(model.norm.mean[...], twin.norm.mean[...], rtol=1e-6)
  assert float(jnp.max(jnp.abs(model.norm.mean[...]))) > 0  # the running average moved
  # the record is the micro-batch estimator's, on the frozen state
  graphdef, params, rest = nnx.split(MLP(nnx.Rngs(0), batch_norm=True), nnx.Param, ...)
  pure = lambda p, b: _loss(nnx.merge(graphdef, p, rest, copy=True), b)[0]
  _, _, expected = dbj.gradient_stats(pure, params, batch, method="microbatch")
  np.testing.assert_allclose(float(stats.sum_sq), float(expected.sum_sq), rtol=1e-6)
  model.eval()  # running averages: rows independent again
  assert dbj.nnx.resolve_method(model, "auto") == "auto"


def test_bad_method_is_named():
  with pytest.raises(ValueError, match="method must be one of"):
    dbj.nnx.value_and_grad(_loss, method="fast")


class CNN(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.out = nnx.Linear(4 * 4 * 4, 2, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.norm(self.conv(x)))
    return self.out(self.drop(h.reshape(h.shape[0], -1)))


def test_cnn_with_dropout_and_batch_norm_trains_and_divebatch_grows():
  n, b0 = 32, 4
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(n, 4, 4, 1)), jnp.float32)
  y = jnp.asarray((np.asarray(x).sum(axis=(1, 2, 3)) > 0).astype(np.int32))
  model = CNN(nnx.Rngs(0))
  tx = dbj.adaptive_batch(optax.adam(0.01), dbj.policies.divebatch(0.5, max_batch_size=n, resize_every=1),
                          num_examples=n, base_batch_size=b0)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grad_fn = dbj.nnx.value_and_grad(_loss, has_aux=True)

  @nnx.jit
  def train_step(model, optimizer, batch):
    (loss, _), grads, stats = grad_fn(model, batch)
    optimizer.update(model, grads, stats=stats)
    return loss

  sizes = []
  for epoch in range(3):
    size = dbj.current_batch_size(optimizer.opt_state, epoch=epoch)
    sizes.append(size)
    for start in range(0, n, size):
      train_step(model, optimizer, {"x": x[start:start + size], "y": y[start:start + size]})
  assert sizes[0] == b0 and sizes[-1] > b0, sizes
  assert int(model.drop.rngs.count[...]) == sum(-(-n // s) for s in sizes)
  assert float(jnp.max(jnp.abs(model.norm.mean[...]))) > 0


def test_linen_equivalent():
  """The module doc's recipe: per-example losses with the dropout key folded with the row
  index (rows independent of the chunking), BatchNorm's state through mutable=."""

  class Net(linen.Module):
    @linen.compact
    def __call__(self, x, train):
      h = linen.tanh(linen.Dense(6)(x))
      return linen.Dense(3)(linen.Dropout(0.5, deterministic=not train)(h))

  net, batch, key = Net(), _batch(3), jax.random.key(7)
  params = net.init(jax.random.key(0), batch["x"], False)["params"]

  def one_row(p, x, y, i):
    logits = net.apply({"params": p}, x[None], True, rngs={"dropout": jax.random.fold_in(key, i)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y[None])[0]

  def losses(p, rows):
    rows_of, index = rows
    return jax.vmap(one_row, in_axes=(None, 0, 0, 0))(p, rows_of["x"], rows_of["y"], index)

  rows = (batch, jnp.arange(B))
  loss, grads, stats = dbj.gradient_stats(losses, params, rows, method="exact")
  ref_loss, ref_grads = jax.value_and_grad(lambda p: jnp.mean(losses(p, rows)))(params)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  np.testing.assert_allclose(_flat(grads), _flat(ref_grads), rtol=1e-5, atol=1e-7)
  per_example = np.stack([
      _flat(jax.grad(one_row)(params, batch["x"][i], batch["y"][i], i)) for i in range(B)])
  _assert_stats(stats, _reference_sums(per_example, np.ones(B, bool)))


def test_linen_batch_norm_with_mutable_and_the_micro_batch_estimator():
  class Net(linen.Module):
    @linen.compact
    def __call__(self, x, train):
      h = linen.BatchNorm(use_running_average=not train, momentum=0.9)(linen.Dense(6)(x))
      return linen.Dense(3)(linen.tanh(h))

  net, batch = Net(), _batch(4)
  variables = net.init(jax.random.key(0), batch["x"], False)
  params, batch_stats = variables["params"], variables["batch_stats"]

  def losses(p, rows):
    logits, _ = net.apply({"params": p, "batch_stats": batch_stats}, rows["x"], True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, rows["y"])

  _, _, stats = dbj.gradient_stats(losses, params, batch, method="microbatch", chunk_size=2)
  # reference: the K = 4 strided micro-batch gradients (rows j, j+4) and the estimator's formula
  micro = [_flat(jax.grad(lambda p: jnp.mean(losses(p, jax.tree.map(lambda a: a[j::4], batch))))(params))
           for j in range(4)]
  mean = np.mean(micro, axis=0)
  trace = sum(2 * np.sum((g - mean) ** 2) for g in micro) / 3
  np.testing.assert_allclose(float(stats.sum_sq), B * np.sum(mean ** 2) + (B - 1) * trace, rtol=1e-4)
  _, new_state = net.apply({"params": params, "batch_stats": batch_stats}, batch["x"], True, mutable=["batch_stats"])
  assert not np.allclose(new_state["batch_stats"]["BatchNorm_0"]["mean"], batch_stats["BatchNorm_0"]["mean"])
