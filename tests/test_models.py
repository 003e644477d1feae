"""Models and the pure bridge: shapes, losses against float64 numpy, BatchNorm coupling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from divebatch_jax import gradient_stats
from divebatch_jax.train import models


def _images(n, shape, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, *shape), jnp.float32)


def _np_cross_entropy(logits, labels):
  z = np.asarray(logits, np.float64)
  top = z.max(axis=1, keepdims=True)
  log_norm = np.log(np.exp(z - top).sum(axis=1)) + top[:, 0]
  return log_norm - z[np.arange(len(z)), np.asarray(labels)]


@pytest.fixture(scope="module")
def resnet20_of():
  """ResNet-20 per norm, built once (the global mean pooling takes any H, W >= 4)."""
  cache = {}

  def build(norm):
    if norm not in cache:
      cache[norm] = models.create_model(
          "resnet20", input_shape=(32, 32, 3), num_classes=10, seed=0, norm=norm
      )
    return cache[norm]

  return build


@pytest.mark.parametrize(
    "name, shape, norm",
    [
        ("logreg", (64,), None),
        ("logreg", (8, 8, 1), None),
        ("mlp", (64,), None),
        ("cnn", (32, 32, 3), "none"),
        ("cnn", (8, 8, 1), "group"),
        ("cnn", (8, 8, 1), "batch"),
        ("resnet20", (16, 16, 3), "group"),
        ("resnet20", (8, 8, 3), "batch"),
        ("resnet20", (8, 8, 3), "none"),
    ],
)
@pytest.mark.slow
def test_output_shapes(name, shape, norm, resnet20_of):
  if name == "resnet20":
    model = resnet20_of(norm)
  else:
    model = models.create_model(name, input_shape=shape, num_classes=10, seed=0, norm=norm)
  graphdef, params, rest = models.split_model(model)
  apply = jax.jit(lambda p, r, x, train: models.forward(graphdef, p, r, x, train=train)[0],
                  static_argnames="train")
  for train in (False, True) if norm == "batch" else (False,):  # modes differ for BatchNorm only
    logits = apply(params, rest, _images(2, shape), train)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


def _resnet_param_count(blocks, channels, in_ch, classes):
  """Closed form: 3x3 convs without bias, (scale, bias) per normalised channel."""
  width = channels[0]
  total = 9 * in_ch * width + 2 * width
  for stage, (count, ch) in enumerate(zip(blocks, channels)):
    for b in range(count):
      stride = 2 if stage > 0 and b == 0 else 1
      total += 9 * width * ch + 2 * ch + 9 * ch * ch + 2 * ch
      if stride != 1 or width != ch:
        total += width * ch + 2 * ch
      width = ch
  return total + width * classes + classes


def test_resnet20_param_count(resnet20_of):
  count = models.param_count(nnx.state(resnet20_of("group"), nnx.Param))
  assert count == _resnet_param_count((3, 3, 3), (16, 32, 64), 3, 10)
  assert 0.26e6 < count < 0.28e6


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_resnet18_param_count_abstract(norm):
  abstract = nnx.eval_shape(
      lambda: models.create_model(
          "resnet18", input_shape=(32, 32, 3), num_classes=10, seed=0, norm=norm
      )
  )
  count = models.param_count(nnx.state(abstract, nnx.Param))
  assert count == _resnet_param_count((2, 2, 2, 2), (64, 128, 256, 512), 3, 10)
  assert 11.0e6 < count < 11.3e6
  assert models.uses_batch_norm(abstract) == (norm == "batch")


@pytest.mark.parametrize("shape", [(32, 32, 3), (8, 8, 1)])
def test_small_cnn_is_about_100k_params(shape):
  model = models.create_model("cnn", input_shape=shape, num_classes=10, seed=0)
  assert 80_000 < models.param_count(nnx.state(model, nnx.Param)) < 120_000


def test_logreg_loss_matches_float64_numpy():
  model = models.create_model("logreg", input_shape=(4, 4, 1), num_classes=5, seed=1)
  graphdef, params, rest = models.split_model(model)
  x = _images(6, (4, 4, 1), seed=2)
  y = jnp.array([0, 1, 2, 3, 4, 0])
  losses = jax.jit(models.per_example_loss_fn(graphdef, rest))(params, {"x": x, "y": y})
  w = np.asarray(params["linear"]["kernel"][...], np.float64)
  b = np.asarray(params["linear"]["bias"][...], np.float64)
  logits = np.asarray(x, np.float64).reshape(6, -1) @ w + b
  assert losses.shape == (6,)
  np.testing.assert_allclose(losses, _np_cross_entropy(logits, y), rtol=1e-5, atol=1e-6)


def test_cnn_loss_matches_float64_numpy_from_logits():
  model = models.create_model("cnn", input_shape=(8, 8, 1), num_classes=10, seed=0, norm="group")
  graphdef, params, rest = models.split_model(model)
  x, y = _images(3, (8, 8, 1)), jnp.array([9, 0, 4])
  losses = jax.jit(models.per_example_loss_fn(graphdef, rest))(params, {"x": x, "y": y})
  logits = jax.jit(lambda p, x: models.forward(graphdef, p, rest, x, train=True)[0])(params, x)
  np.testing.assert_allclose(losses, _np_cross_entropy(logits, y), rtol=1e-5, atol=1e-6)


def _row_losses(graphdef, params, rest, x, *, train, mask=None):
  y = jnp.arange(x.shape[0]) % 10
  losses = jax.jit(models.per_example_losses, static_argnums=0, static_argnames="train")
  return losses(graphdef, params, rest, {"x": x, "y": y}, train=train, mask=mask)


def test_group_norm_resnet20_rows_are_independent(resnet20_of):
  graphdef, params, rest = models.split_model(resnet20_of("group"))
  x = _images(2, (8, 8, 3))
  changed = x.at[1].set(5.0 * _images(1, (8, 8, 3), seed=9)[0])
  before, _ = _row_losses(graphdef, params, rest, x, train=True)
  after, _ = _row_losses(graphdef, params, rest, changed, train=True)
  np.testing.assert_allclose(after[0], before[0], rtol=1e-6)
  assert abs(float(after[1] - before[1])) > 1e-4  # the changed row did change


def test_batch_norm_resnet20_couples_rows_in_train_mode_only(resnet20_of):
  graphdef, params, rest = models.split_model(resnet20_of("batch"))
  x = _images(2, (8, 8, 3))
  changed = x.at[1].set(5.0 * _images(1, (8, 8, 3), seed=9)[0])
  train_before, _ = _row_losses(graphdef, params, rest, x, train=True)
  train_after, _ = _row_losses(graphdef, params, rest, changed, train=True)
  assert abs(float(train_after[0] - train_before[0])) > 1e-4  # documented coupling
  eval_before, _ = _row_losses(graphdef, params, rest, x, train=False)
  eval_after, _ = _row_losses(graphdef, params, rest, changed, train=False)
  np.testing.assert_allclose(eval_after[0], eval_before[0], rtol=1e-6)


def _tiny_batch_norm_cnn():
  return models.SmallCNN(1, 10, channels=(4, 6), norm="batch", rngs=nnx.Rngs(0))


def test_batch_norm_mask_ignores_padded_rows():
  graphdef, params, rest = models.split_model(_tiny_batch_norm_cnn())
  real = _images(2, (8, 8, 1))
  padded = jnp.concatenate([real, 100.0 * _images(2, (8, 8, 1), seed=5)])
  mask = jnp.array([True, True, False, False])
  want, want_rest = _row_losses(graphdef, params, rest, real, train=True)
  got, got_rest = _row_losses(graphdef, params, rest, padded, train=True, mask=mask)
  np.testing.assert_allclose(got[:2], want, rtol=2e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(got_rest), jax.tree.leaves(want_rest)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_forward_updates_running_averages_without_mutating_inputs():
  model = _tiny_batch_norm_cnn()
  graphdef, params, rest = models.split_model(model)
  x = _images(4, (8, 8, 1))
  first_conv = np.asarray(model.convs[0](x), np.float64)  # no bias: the first BatchNorm's input
  train_forward = jax.jit(lambda p, r, x: models.forward(graphdef, p, r, x, train=True))
  _, new_rest = train_forward(params, rest, x)
  mean = np.asarray(new_rest["norms"][0]["layer"]["mean"][...])
  var = np.asarray(new_rest["norms"][0]["layer"]["var"][...])
  np.testing.assert_allclose(mean, 0.1 * first_conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(var, 0.9 + 0.1 * first_conv.var(axis=(0, 1, 2)), rtol=1e-4)
  # eager call: the caller's rest is untouched
  models.forward(graphdef, params, rest, x, train=True)
  np.testing.assert_array_equal(rest["norms"][0]["layer"]["mean"][...], 0.0)
  _, eval_rest = models.forward(graphdef, params, rest, x, train=False)
  for a, b in zip(jax.tree.leaves(eval_rest), jax.tree.leaves(rest)):
    np.testing.assert_array_equal(a, b)


def test_per_example_loss_fn_refuses_batch_norm_in_train_mode():
  graphdef, params, rest = models.split_model(_tiny_batch_norm_cnn())
  with pytest.raises(ValueError, match="BatchNorm"):
    models.per_example_loss_fn(graphdef, rest)
  loss_fn = models.per_example_loss_fn(graphdef, rest, train=False)
  assert loss_fn(params, {"x": _images(2, (8, 8, 1)), "y": jnp.array([1, 2])}).shape == (2,)


def test_split_model_separates_params_from_batch_stats():
  for norm, has_stats in (("batch", True), ("group", False), ("layer", False), ("none", False)):
    model = models.create_model("cnn", input_shape=(8, 8, 1), num_classes=10, seed=0, norm=norm)
    _, params, rest = models.split_model(model)
    is_var = lambda v: isinstance(v, nnx.Variable)
    assert all(isinstance(v, nnx.Param) for v in jax.tree.leaves(params, is_leaf=is_var))
    rest_vars = jax.tree.leaves(rest, is_leaf=is_var)
    assert all(isinstance(v, nnx.BatchStat) for v in rest_vars)
    assert bool(rest_vars) == has_stats == models.uses_batch_norm(model)


def test_bridge_gives_closed_form_per_example_gradient_norms():
  """Logistic regression: ||g_i||² = (||x_i||² + 1)·||softmax(z_i) − e_{y_i}||²."""
  model = models.create_model("logreg", input_shape=(6,), num_classes=4, seed=3)
  graphdef, params, rest = models.split_model(model)
  x = _images(9, (6,), seed=4)
  y = jnp.array([0, 1, 2, 3, 0, 1, 2, 3, 0])
  mask = jnp.arange(9) < 7
  loss_fn = models.per_example_loss_fn(graphdef, rest)
  stats_fn = jax.jit(lambda p, b, m: gradient_stats(loss_fn, p, b, m))
  _, grad, stats = stats_fn(params, {"x": x, "y": y}, mask)

  x64 = np.asarray(x, np.float64)[:7]
  logits = x64 @ np.asarray(params["linear"]["kernel"][...], np.float64)
  logits += np.asarray(params["linear"]["bias"][...], np.float64)
  p = np.exp(logits - logits.max(1, keepdims=True))
  residual = p / p.sum(1, keepdims=True) - np.eye(4)[np.asarray(y)[:7]]
  sq_norms = ((x64**2).sum(1) + 1.0) * (residual**2).sum(1)
  assert int(stats.count) == 7
  np.testing.assert_allclose(stats.sum_sq, sq_norms.sum(), rtol=1e-5)
  np.testing.assert_allclose(
      grad["linear"]["kernel"][...], x64.T @ residual / 7, rtol=1e-5, atol=1e-7
  )
  np.testing.assert_allclose(grad["linear"]["bias"][...], residual.mean(0), rtol=1e-5, atol=1e-7)


def test_correct_count_counts_real_rows_only():
  model = models.create_model("mlp", input_shape=(5,), num_classes=3, seed=0, hidden_sizes=(8,))
  graphdef, params, rest = models.split_model(model)
  x = _images(12, (5,), seed=1)
  predicted = np.asarray(model(x)).argmax(1)
  y = jnp.asarray(np.where(np.arange(12) % 2 == 0, predicted, (predicted + 1) % 3))
  mask = jnp.arange(12) < 9
  count = jax.jit(lambda p, b, m: models.correct_count(graphdef, p, rest, b, m))
  got = count(params, {"x": x, "y": y}, mask)
  assert int(got) == int(np.sum((predicted == np.asarray(y))[:9])) == 5


def test_same_seed_same_params_other_seed_differs():
  def params_of(seed):
    model = models.create_model("cnn", input_shape=(8, 8, 1), num_classes=10, seed=seed)
    return jax.tree.leaves(nnx.state(model, nnx.Param))

  a, b, c = params_of(0), params_of(0), params_of(1)
  assert all(np.array_equal(u, v) for u, v in zip(a, b))
  assert not all(np.array_equal(u, v) for u, v in zip(a, c))


def test_group_count():
  assert [models.group_count(c) for c in (1, 16, 32, 64, 128, 512, 24)] == [1, 4, 8, 16, 32, 32, 6]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="vgg"), "name must be one of"),
        (dict(name="resnet20", norm="instance"), "norm must be one of"),
        (dict(name="logreg", norm="batch"), "norm must be 'none'"),
        (dict(name="cnn", hidden_sizes=(4,)), "hidden_sizes applies to the mlp only"),
        (dict(name="cnn", input_shape=(64,)), r"input_shape must be \(H, W, C\)"),
        (dict(name="mlp", input_shape=(0, 3)), "input_shape must be"),
        (dict(name="mlp", num_classes=0), "num_classes must be a positive int"),
        (dict(name="mlp", hidden_sizes=()), "hidden_sizes must be"),
    ],
)
def test_create_model_rejects_bad_arguments(kwargs, match):
  args = dict(input_shape=(8, 8, 1), num_classes=10, seed=0) | kwargs
  with pytest.raises(ValueError, match=match):
    models.create_model(args.pop("name"), **args)


def test_models_reject_bad_inputs():
  cnn = models.create_model("cnn", input_shape=(8, 8, 1), num_classes=10, seed=0)
  with pytest.raises(ValueError, match="1 channels"):
    cnn(jnp.ones((2, 8, 8, 3)))
  with pytest.raises(TypeError, match="floating"):
    cnn(jnp.ones((2, 8, 8, 1), jnp.uint8))
  logreg = models.create_model("logreg", input_shape=(6,), num_classes=2, seed=0)
  with pytest.raises(ValueError, match="6 features"):
    logreg(jnp.ones((2, 5)))
  graphdef, params, rest = models.split_model(logreg)
  with pytest.raises(ValueError, match="keys 'x' and 'y'"):
    models.per_example_loss_fn(graphdef, rest)(params, {"x": jnp.ones((2, 6))})
