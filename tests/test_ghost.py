"""Ghost norms against brute force: a Python loop of jax.grad, one example at a time."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from divebatch_jax.stats import taps, gradient_stats
from divebatch_jax.stats.ghost import sums as ghost_sums_module


def brute_force(loss_fn, params, batch, mask=None):
  """Per-example gradients one example at a time; every sum in float64 numpy."""
  grad_one = jax.jit(jax.value_and_grad(lambda p, example: loss_fn(p, example)[0]))
  b = len(jax.tree.leaves(batch)[0])
  mask = np.ones(b, bool) if mask is None else np.asarray(mask)
  losses, rows = [], []
  for i in range(b):
    loss, grad = grad_one(params, jax.tree.map(lambda x: x[i : i + 1], batch))
    losses.append(float(loss))
    rows.append(np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in jax.tree.leaves(grad)]))
  g = np.where(mask[:, None], np.stack(rows), 0.0)  # masked rows may hold NaN garbage
  gbar = g.sum(0) / max(mask.sum(), 1)
  return {
      "sq_norms": (g**2).sum(1),
      "count": int(mask.sum()),
      "loss": float(np.sum(np.where(mask, losses, 0.0)) / max(mask.sum(), 1)),
      "sum_g": g.sum(0),
      "sum_sq": float((g**2).sum()),
      "inner_products": g @ gbar,
      "sum_ip": float(((g @ gbar) ** 2).sum()),
  }


def assert_ghost_matches(loss_fn, params, batch, mask=None, rtol=1e-5, chunk_size=None, rows=True):
  """The ghost record (sum_ip from the same pass without ``chunk_size``, from the JVP with
  it) and, if ``rows``, each example's squared norm and <g_i, ḡ> equal brute force."""
  ref = brute_force(loss_fn, params, batch, mask)
  b = len(ref["sq_norms"])
  real = jnp.ones(b, bool) if mask is None else jnp.asarray(mask)

  @jax.jit
  def ghost(p, x):
    sums = taps.ghost_sums(loss_fn, p, x, real, about_mean=True) if rows else None
    return sums, gradient_stats(loss_fn, p, x, mask, method="ghost", chunk_size=chunk_size)

  sums, (loss, grad, stats) = ghost(params, batch)
  if rows:
    np.testing.assert_allclose(sums.sq_norms, ref["sq_norms"], rtol=rtol, atol=1e-12)
    inner = ref["inner_products"]
    np.testing.assert_allclose(sums.inner_products, inner, rtol=rtol, atol=rtol * np.abs(inner).max())
  assert int(stats.count) == ref["count"]
  np.testing.assert_allclose(loss, ref["loss"], rtol=rtol)
  sum_g = np.concatenate([np.ravel(x) for x in jax.tree.leaves(stats.sum_g)])
  np.testing.assert_allclose(sum_g, ref["sum_g"], rtol=rtol, atol=rtol * np.abs(ref["sum_g"]).max())
  mean = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grad)])
  np.testing.assert_allclose(mean, ref["sum_g"] / ref["count"], rtol=rtol, atol=rtol * np.abs(mean).max())
  np.testing.assert_allclose(float(stats.sum_sq), ref["sum_sq"], rtol=rtol)
  np.testing.assert_allclose(float(stats.sum_ip), ref["sum_ip"], rtol=rtol)


def leaf_forms(loss_fn, params, batch):
  """How each leaf is covered on the CPU, without the cost model's numbers."""
  described = taps.trace_plan(loss_fn, params, batch, backend="cpu").describe()
  return {name: how.split(" T=")[0] for name, how in described.items()}


def nnx_loss(model, num_classes):
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(p, batch):
    logits = nnx.merge(graphdef, p)(batch["x"])
    return -jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(batch["y"], num_classes), -1)

  return loss_fn, params


def labelled(x, num_classes, seed=1):
  return {"x": x, "y": jax.random.randint(jax.random.key(seed), (len(x),), 0, num_classes)}


# --------------------------------------------------------------------------- models


def mlp_loss(p, batch):
  """Plain JAX; the second kernel is stored transposed (a transpose alias)."""
  h = jnp.tanh(batch["x"] @ p["w1"] + p["b1"])
  h = jax.nn.relu(h @ p["w2_t"].T + p["b2"])
  logits = h @ p["w3"]
  return -jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(batch["y"], 4), -1)


def mlp_setup(b=12):
  k = jax.random.split(jax.random.key(0), 5)
  params = {
      "w1": jax.random.normal(k[0], (10, 32)) / 3,
      "b1": 0.1 * jax.random.normal(k[1], (32,)),
      "w2_t": jax.random.normal(k[2], (24, 32)) / 6,
      "b2": jnp.full((24,), 0.05),
      "w3": jax.random.normal(k[3], (24, 4)) / 5,
  }
  return params, labelled(jax.random.normal(k[4], (b, 10)), 4)


class StridedCNN(nnx.Module):
  """Strides, SAME / explicit asymmetric padding, kernel and input dilation, groups."""

  def __init__(self, rngs):
    self.c1 = nnx.Conv(3, 8, (3, 3), strides=2, padding="SAME", rngs=rngs)
    self.c2 = nnx.Conv(8, 8, (3, 2), strides=(1, 2), padding=((2, 0), (1, 2)), kernel_dilation=(2, 1), rngs=rngs)
    self.c3 = nnx.Conv(8, 12, (2, 2), feature_group_count=4, padding="VALID", rngs=rngs)
    self.up = nnx.ConvTranspose(12, 6, (3, 3), strides=2, padding="SAME", rngs=rngs)
    self.c1d = nnx.Conv(6, 5, (4,), strides=3, padding=((1, 3),), rngs=rngs)
    self.head = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.c1(x))
    h = jax.nn.relu(self.c2(h))
    h = jnp.tanh(self.c3(h))
    h = jax.nn.relu(self.up(h))
    h = self.c1d(h.reshape(h.shape[0], -1, h.shape[-1]))
    return self.head(h.mean(1))


class UnitStrideCNN(nnx.Module):
  """Unit-stride convolutions whose blocks shift the output cotangent (no more output
  than input channels): asymmetric, zero, negative-extent (VALID) and over-wide padding,
  kernel dilation, depthwise groups, 1-D; and one that shifts the input (more outputs)."""

  def __init__(self, rngs):
    self.c1 = nnx.Conv(4, 4, (3, 2), padding=((2, 0), (1, 2)), kernel_dilation=(2, 1), rngs=rngs)
    self.c2 = nnx.Conv(4, 3, (2, 3), padding="VALID", rngs=rngs)
    self.c3 = nnx.Conv(3, 3, (3, 3), padding=((3, 1), (0, 4)), feature_group_count=3, rngs=rngs)
    self.c4 = nnx.Conv(3, 6, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
    self.c1d = nnx.Conv(6, 2, (3,), padding=((0, 2),), kernel_dilation=(2,), rngs=rngs)
    self.head = nnx.Linear(2, 3, rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.c2(jax.nn.relu(self.c1(x))))
    h = jax.nn.relu(self.c4(jnp.tanh(self.c3(h))))
    h = self.c1d(h.reshape(h.shape[0], -1, h.shape[-1]))
    return self.head(h.mean(1))


@pytest.mark.parametrize("factor", [1e-6, 1e6], ids=["gram", "product"])
def test_unit_stride_convolutions_with_shifted_cotangents_equal_brute_force(factor, monkeypatch):
  """Per-example norms and the summed gradient of unit-stride convolutions of every
  padding kind in both forms, with garbage in masked rows: exact at 1e-5."""
  monkeypatch.setitem(taps.GRAM_COST_FACTOR, "cpu", factor)
  model = UnitStrideCNN(nnx.Rngs(3))
  loss_fn, params = nnx_loss(model, 3)
  batch = labelled(jax.random.normal(jax.random.key(4), (6, 7, 8, 4)), 3)
  forms = leaf_forms(loss_fn, params, batch)
  expected = "(gram)" if factor < 1 else "(product)"
  assert all(v == f"conv_general_dilated {expected}" for k, v in forms.items() if "kernel" in k and "head" not in k), forms
  mask = np.array([True, False, True, True, False, True])
  garbage = dict(batch, x=batch["x"].at[~mask].set(1e3))
  assert_ghost_matches(loss_fn, params, garbage, mask)


class TokenModel(nnx.Module):
  """Two embedding tables (one Gram, one product form) and a dense layer over T = 6 tokens."""

  def __init__(self, rngs):
    self.words = nnx.Embed(60, 8, rngs=rngs)  # T²·D = 288 <= the table's 480: gram
    self.tags = nnx.Embed(5, 8, rngs=rngs)  # T²·D = 288 > the table's 40: product
    self.mix = nnx.Linear(8, 16, rngs=rngs)  # T = 6 tokens: ρ·T·(C+F) = 144 > C·F = 128: product
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    h = self.words(x[..., 0]) + self.tags(x[..., 1])
    return self.head(jax.nn.gelu(self.mix(h)).mean(1))


class BasicBlock(nnx.Module):
  def __init__(self, cin, cout, stride, rngs):
    self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding=1, rngs=rngs)
    self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=1, rngs=rngs)
    self.shortcut = (
        nnx.Conv(cin, cout, (1, 1), strides=stride, rngs=rngs) if stride != 1 or cin != cout else None
    )

  def __call__(self, x):
    h = self.conv2(jax.nn.relu(self.conv1(x)))
    return jax.nn.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet20(nnx.Module):
  """He et al. 2016 CIFAR ResNet-20 (3 stages x 3 blocks, 16/32/64) without normalisation."""

  def __init__(self, rngs, num_classes=10):
    self.stem = nnx.Conv(3, 16, (3, 3), padding=1, rngs=rngs)
    blocks, cin = [], 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
      for i in range(3):
        blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1, rngs))
        cin = cout
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(64, num_classes, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.stem(x))
    for block in self.blocks:
      h = block(h)
    return self.head(h.mean((1, 2)))


# --------------------------------------------------------------------------- tests


def test_mlp_equals_brute_force_and_plan(monkeypatch):
  # T = 1: the Gram form wherever ρ·(C + F) <= C·F; at ρ = 3 every layer here (10x32, 32x24, 24x4).
  monkeypatch.setitem(taps.GRAM_COST_FACTOR, "cpu", 3.0)
  params, batch = mlp_setup()
  assert leaf_forms(mlp_loss, params, batch) == {
      "['b1']": "elementwise",
      "['b2']": "elementwise",
      "['w1']": "dot_general (gram)",
      "['w2_t']": "dot_general (gram)",
      "['w3']": "dot_general (gram)",
  }
  assert_ghost_matches(mlp_loss, params, batch)


@pytest.mark.slow
def test_strided_padded_dilated_grouped_cnn_equals_brute_force(monkeypatch):
  monkeypatch.setitem(taps.GRAM_COST_FACTOR, "cpu", 1.0)  # some layers in each form
  loss_fn, params = nnx_loss(StridedCNN(nnx.Rngs(0)), 3)
  batch = labelled(jax.random.normal(jax.random.key(2), (5, 9, 11, 3)), 3)
  forms = leaf_forms(loss_fn, params, batch)
  kernels = {k: v for k, v in forms.items() if "kernel" in k}
  assert all(v.startswith(("conv_general_dilated", "dot_general")) for v in kernels.values()), forms
  assert {v.split()[-1] for v in kernels.values()} == {"(product)", "(gram)"}, forms
  assert all(v == "elementwise" for k, v in forms.items() if "bias" in k)
  assert_ghost_matches(loss_fn, params, batch)


def test_embedding_model_both_lookup_forms_equal_brute_force():
  loss_fn, params = nnx_loss(TokenModel(nnx.Rngs(0)), 3)
  k1, k2 = jax.random.split(jax.random.key(3))
  ids = jnp.stack([jax.random.randint(k1, (7, 6), 0, 60), jax.random.randint(k2, (7, 6), 0, 5)], -1)
  forms = leaf_forms(loss_fn, params, {"x": ids, "y": ids[:, 0, 0]})
  assert forms["['words']['embedding'].value"] == "gather (gram)"
  assert forms["['tags']['embedding'].value"] == "gather (product)"
  assert forms["['mix']['kernel'].value"] == "dot_general (product)"
  ids = ids.at[0, :3, 0].set(17)  # repeated tokens: rows of one example add up
  assert_ghost_matches(loss_fn, params, labelled(ids, 3))


@pytest.mark.slow
def test_resnet20_without_norm_equals_brute_force():
  loss_fn, params = nnx_loss(ResNet20(nnx.Rngs(0)), 10)
  batch = labelled(jax.random.normal(jax.random.key(4), (3, 8, 8, 3)), 10)
  forms = leaf_forms(loss_fn, params, batch)
  assert sum(v.startswith("conv_general_dilated") for v in forms.values()) == 21
  assert_ghost_matches(loss_fn, params, batch, rows=False)  # rows: the other tests (compile time)


def test_mask_padded_rows_count_nowhere():
  params, batch = mlp_setup(b=10)
  mask = np.array([True, False, True, True, False, True, True, True, False, False])
  garbage = batch["x"].at[~mask].set(1e3)  # padded rows hold anything
  padded = {"x": garbage, "y": batch["y"]}
  assert_ghost_matches(mlp_loss, params, padded, mask)
  sums = jax.jit(taps.ghost_sums, static_argnums=0)(mlp_loss, params, padded, jnp.asarray(mask))
  assert np.all(np.asarray(sums.sq_norms)[~mask] == 0.0)


def test_chunked_ghost_equals_brute_force():
  params, batch = mlp_setup(b=11)
  assert_ghost_matches(mlp_loss, params, batch, mask=np.arange(11) < 9, chunk_size=4)


def test_linen_model_unchanged():
  class Net(linen.Module):
    @linen.compact
    def __call__(self, x):
      x = linen.Conv(4, (3, 3), strides=2)(x)
      return linen.Dense(3)(jax.nn.relu(x).reshape(x.shape[0], -1))

  net = Net()
  x = jax.random.normal(jax.random.key(5), (6, 6, 6, 2))
  params = net.init(jax.random.key(6), x[:1])

  def loss_fn(p, batch):
    return jnp.sum(net.apply(p, batch["x"]) ** 2, -1)

  forms = leaf_forms(loss_fn, params, {"x": x})
  kinds = sorted(form.split(" (")[0] for form in forms.values())  # the forms follow the cost model
  assert kinds == ["conv_general_dilated", "dot_general", "elementwise", "elementwise"], forms
  assert_ghost_matches(loss_fn, params, {"x": x})


def test_tied_table_is_tapped_and_a_weight_shared_by_scan_iterations_falls_back():
  """A table looked up and then read by the output product is tapped in both uses (cross
  term included); a kernel closed over by lax.scan (the same weight in every
  iteration) gets per-example copies. Both exact."""
  k = jax.random.split(jax.random.key(7), 3)
  params = {"table": jax.random.normal(k[0], (9, 5)), "w_rec": jax.random.normal(k[1], (5, 5)) / 3}

  def loss_fn(p, batch):
    h = p["table"][batch["ids"]].mean(1)  # (B, 5)
    h, _ = jax.lax.scan(lambda h, _: (jnp.tanh(h @ p["w_rec"]), None), h, None, length=3)
    logits = h @ p["table"].T  # tied output projection
    return -jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(batch["y"], 9), -1)

  batch = {"ids": jax.random.randint(k[2], (6, 4), 0, 9), "y": jnp.arange(6)}
  forms = taps.trace_plan(loss_fn, params, batch).describe()
  assert forms["['table']"].startswith("gather (") and "tied" in forms["['table']"], forms
  assert forms["['w_rec']"] == "per-example fallback", forms
  assert_ghost_matches(loss_fn, params, batch)


def test_leaf_inside_jit_and_bf16_cast_is_tapped():
  @jax.jit
  def dense(x, w):
    return x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)

  params = {"w": jax.random.normal(jax.random.key(8), (6, 3)), "unused": jnp.ones(2)}

  def loss_fn(p, batch):
    return jnp.sum(dense(batch["x"], p["w"]).astype(jnp.float32) ** 2, -1)

  batch = {"x": jax.random.normal(jax.random.key(9), (5, 6))}
  forms = leaf_forms(loss_fn, params, batch)
  assert forms["['unused']"] == "unused" and forms["['w']"].startswith("dot_general ("), forms
  assert_ghost_matches(loss_fn, params, batch, rtol=2e-2)


def test_scalar_loss_is_refused_with_a_clear_error():
  params, batch = mlp_setup()
  with pytest.raises(ValueError, match="per-example losses of shape"):
    gradient_stats(lambda p, b: jnp.mean(mlp_loss(p, b)), params, batch, method="ghost")


# --------------------------------------------------------------------------- every layer kind


class NormZoo(nnx.Module):
  """Convolutions with and without bias, depthwise and grouped; GroupNorm, LayerNorm,
  RMSNorm and eval-mode BatchNorm; a dense layer on a sequence; an embedding."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
    self.group_norm = nnx.GroupNorm(8, num_groups=2, rngs=rngs)
    self.depthwise = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
    self.batch_norm = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
    self.grouped = nnx.Conv(8, 6, (1, 1), strides=2, feature_group_count=2, use_bias=False, rngs=rngs)
    self.embed = nnx.Embed(7, 6, rngs=rngs)
    self.layer_norm = nnx.LayerNorm(6, rngs=rngs)
    self.sequence = nnx.Linear(6, 5, rngs=rngs)  # on (B, T, 6)
    self.rms_norm = nnx.RMSNorm(5, rngs=rngs)
    self.head = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.group_norm(self.conv(x["image"])))
    h = jax.nn.relu(self.batch_norm(self.depthwise(h)))
    tokens = self.grouped(h).reshape(h.shape[0], -1, 6)  # (B, T, 6)
    tokens = self.layer_norm(tokens + self.embed(x["ids"]))
    h = self.rms_norm(jnp.tanh(self.sequence(tokens)))
    return self.head(h.mean(1))


def norm_zoo_setup(b=7):
  model = NormZoo(nnx.Rngs(0))
  k = jax.random.split(jax.random.key(11), 6)
  bn = model.batch_norm  # eval mode with non-trivial running averages
  bn.mean[...] = 0.3 * jax.random.normal(k[0], bn.mean.shape)
  bn.var[...] = 0.5 + jax.random.uniform(k[1], bn.var.shape)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p, batch):
    logits = nnx.merge(graphdef, p, rest)(batch)
    return -jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(batch["y"], 3), -1)

  batch = {
      "image": jax.random.normal(k[2], (b, 6, 6, 3)),
      "ids": jax.random.randint(k[3], (b, 9), 0, 7),
      "y": jax.random.randint(k[4], (b,), 0, 3),
  }
  return loss_fn, params, batch


@pytest.mark.parametrize("factor", [1e-6, 1e6], ids=["gram", "product"])
def test_every_layer_kind_in_both_forms_with_garbage_rows_equals_brute_force(factor, monkeypatch):
  """GroupNorm, LayerNorm, RMSNorm, eval BatchNorm, depthwise / grouped / bias-free
  convolutions, a dense layer on a sequence and an embedding: exact at 1e-5 in float32,
  whichever form the cost model picks; masked rows full of garbage count nowhere."""
  monkeypatch.setitem(taps.GRAM_COST_FACTOR, "cpu", factor)
  loss_fn, params, batch = norm_zoo_setup()
  forms = leaf_forms(loss_fn, params, batch)
  assert "per-example fallback" not in forms.values(), forms
  kernels = [v for k, v in forms.items() if "kernel" in k or "embedding" in k]
  expected = "(gram)" if factor < 1 else "(product)"
  assert all(v.endswith(expected) for v in kernels if not v.startswith("gather")), forms
  assert all(v == "elementwise" for k, v in forms.items() if "bias" in k or "scale" in k), forms
  mask = np.array([True, True, False, True, False, True, True])
  garbage = dict(batch, image=batch["image"].at[~mask].set(1e3))
  assert_ghost_matches(loss_fn, params, garbage, mask)


def test_layer_on_a_constant_input_is_tapped_and_exact():
  """A dense layer applied to a constant (a learned position table projected by a
  kernel) is tapped on a per-example copy of its input: each example has its own
  output cotangent, so the norms are exact (not the batch's summed cotangent)."""
  k = jax.random.split(jax.random.key(12), 3)
  params = {"proj": jax.random.normal(k[0], (3, 4)) / 2, "w": jax.random.normal(k[1], (4, 2)) / 2}
  positions = jnp.linspace(-1.0, 1.0, 5 * 3).reshape(5, 3)

  def loss_fn(p, batch):
    pos = positions @ p["proj"]  # (5, 4): no example in it
    h = jnp.tanh(batch["x"] + pos[None])  # (B, 5, 4)
    return jnp.sum((h @ p["w"]) ** 2, axis=(1, 2))

  batch = {"x": jax.random.normal(k[2], (6, 5, 4))}
  forms = leaf_forms(loss_fn, params, batch)
  assert forms["['proj']"].startswith("dot_general ("), forms
  assert forms["['w']"].startswith("dot_general"), forms
  assert_ghost_matches(loss_fn, params, batch)


def test_layernorm_resnet20_is_tapped_and_equals_the_per_example_loop():
  """The CLI's ResNet-20 with LayerNorm (each pixel over its channels): no fallback leaf,
  and ``auto`` gives the brute-force record (per-example gradients one at a time)."""
  from divebatch_jax.train import models

  model = models.create_model("resnet20", input_shape=(8, 8, 3), num_classes=10, seed=0, norm="layer")
  graphdef, params, rest = models.split_model(model)
  loss_fn = models.per_example_loss_fn(graphdef, rest)
  batch = labelled(jax.random.normal(jax.random.key(5), (3, 8, 8, 3)), 10)
  forms = leaf_forms(loss_fn, params, batch)
  assert "per-example fallback" not in forms.values(), forms
  norm_leaves = [leaf for leaf in forms if "norm" in leaf]
  assert norm_leaves and all(forms[leaf] == "elementwise" for leaf in norm_leaves), forms
  assert_ghost_matches(loss_fn, params, batch, rtol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_groupnorm_resnets_have_no_per_example_fallback(name):
  """Every leaf of the CLI's GroupNorm ResNets is tapped (product or Gram) or elementwise."""
  from divebatch_jax.train import models

  model = models.create_model(name, input_shape=(32, 32, 3), num_classes=10, seed=0, norm="group")
  graphdef, params, rest = models.split_model(model)
  loss_fn = models.per_example_loss_fn(graphdef, rest)
  batch = {"x": jnp.zeros((2, 32, 32, 3)), "y": jnp.zeros(2, jnp.int32)}
  for backend in ("cpu", "gpu"):
    forms = taps.trace_plan(loss_fn, params, batch, backend=backend).describe()
    assert not [leaf for leaf, how in forms.items() if how in ("per-example fallback", "unused")], forms
    kernels = [how for leaf, how in forms.items() if "kernel" in leaf]
    assert all(how.startswith(("conv_general_dilated (", "dot_general (")) for how in kernels), forms


@pytest.mark.slow
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.float64], ids=["f32-params", "f64-params"])
@pytest.mark.parametrize("factor", [1e-6, 1e6], ids=["gram", "product"])
def test_every_layer_kind_under_x64_equals_brute_force(factor, param_dtype, monkeypatch):
  """With ``jax_enable_x64`` (int64 indices by default) every layer kind of the zoo --
  depthwise, grouped and strided convolutions (their kernel offsets visited in a loop on
  the CPU), norms, a sequence layer, an embedding -- in both forms gives the brute-force
  record; so do the exact and micro-batch (one row per group: exact) methods."""
  monkeypatch.setitem(taps.GRAM_COST_FACTOR, "cpu", factor)
  with jax.enable_x64(True):
    loss_fn, params, batch = norm_zoo_setup()
    params = jax.tree.map(lambda x: x.astype(param_dtype), params)
    batch = dict(batch, ids=batch["ids"].astype(jnp.int64))
    mask = np.array([True, True, False, True, False, True, True])
    garbage = dict(batch, image=batch["image"].at[~mask].set(1e3))
    assert_ghost_matches(loss_fn, params, garbage, mask)
    ref = brute_force(loss_fn, params, garbage, mask)
    for method in ("exact", "microbatch", "auto"):
      stats = jax.jit(lambda p, x, m=method: gradient_stats(loss_fn, p, x, mask, method=m, chunk_size=1 if m == "microbatch" else None)[2])(params, garbage)
      np.testing.assert_allclose(float(stats.sum_sq), ref["sum_sq"], rtol=1e-5, err_msg=method)


# --------------------------------------------------------------------------- scans, tied tables, transformers


def scanned_loss(p, batch):
  """Plain JAX: a (L, D, D) stack of kernels and (L, D) biases applied by lax.scan, a
  position table at constant ids, and a table read twice: looked up, then multiplied
  with its rows as the contracting axis ("C") after the scan, and as the output axis
  ("F", a tied head)."""
  h = p["table"][batch["ids"]] + p["pos"][jnp.arange(batch["ids"].shape[1])]  # (B, T, D)

  def layer(h, w):
    return jnp.tanh(h @ w["kernel"] + w["bias"]), None

  h, _ = jax.lax.scan(layer, h, p["stack"])
  mix = jax.nn.softmax(h @ p["table"].T)  # (B, T, V): the tied head
  return jnp.sum((mix @ p["readout"]) ** 2, axis=(1, 2))


def scanned_setup(b=6, t=5, d=4, v=9, layers=3):
  k = jax.random.split(jax.random.key(13), 6)
  params = {
      "table": jax.random.normal(k[0], (v, d)),
      "pos": jax.random.normal(k[1], (t, d)),
      "stack": {"kernel": jax.random.normal(k[2], (layers, d, d)) / 2, "bias": 0.1 * jax.random.normal(k[3], (layers, d))},
      "readout": jax.random.normal(k[4], (v, 2)),
  }
  return params, {"ids": jax.random.randint(k[5], (b, t), 0, v)}


@pytest.mark.parametrize("factor", [1e-6, 1e6], ids=["gram", "product"])
def test_scanned_stack_position_table_and_tied_table_equal_brute_force(factor, monkeypatch):
  monkeypatch.setitem(taps.GRAM_COST_FACTOR, "cpu", factor)
  params, batch = scanned_setup()
  forms = leaf_forms(scanned_loss, params, batch)
  assert "per-example fallback" not in forms.values(), forms
  assert forms["['stack']['kernel']"].startswith("dot_general"), forms
  assert forms["['stack']['bias']"] == "elementwise", forms
  assert forms["['pos']"].startswith("gather"), forms
  assert "tied" in taps.trace_plan(scanned_loss, params, batch).describe()["['table']"]
  mask = np.array([True, False, True, True, True, False])
  garbage = dict(batch, ids=batch["ids"].at[~mask].set(10**6))  # out of range: NaN rows
  assert_ghost_matches(scanned_loss, params, garbage, mask)


def test_table_read_by_two_products_still_falls_back():
  """A lookup followed by two products (or two lookups) is not a tied embedding: copies."""
  params, batch = scanned_setup(b=3)

  def loss_fn(p, batch):
    h = p["table"][batch["ids"]]
    return jnp.sum((h @ p["table"].T) ** 2 + (h @ p["table"].T) ** 3, axis=(1, 2))

  assert leaf_forms(loss_fn, params, batch)["['table']"] == "per-example fallback"
  assert_ghost_matches(loss_fn, params, batch)


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "nnx-scan"])
def test_gpt_has_no_fallback_and_auto_equals_brute_force(scan):
  """Token + position tables, pre-LN causal attention, GELU MLP, head tied to the token
  table; blocks in a list or stacked by nnx.vmap and applied by nnx.scan: every leaf
  tapped or elementwise, ``auto`` runs the taps, exact at 1e-5 with garbage rows."""
  from tiny_gpt import TinyGPT, gpt_batch, gpt_loss

  loss_fn, params = gpt_loss(TinyGPT(32, 8, 16, 2, 2, scan=scan, rngs=nnx.Rngs(0)))
  batch = gpt_batch(5, 8, 32)
  described = taps.trace_plan(loss_fn, params, batch).describe()
  assert not [leaf for leaf, how in described.items() if how in ("per-example fallback", "unused")], described
  assert "tied" in described["['tokens']['embedding'].value"], described
  from divebatch_jax.stats import preferred_method

  assert preferred_method(loss_fn, params, batch) == "ghost"
  mask = np.array([True, False, True, True, False])
  garbage = dict(batch, ids=batch["ids"].at[~mask].set(10**6))
  assert_ghost_matches(loss_fn, params, garbage, mask)


@pytest.mark.parametrize("factor", [1e-6, 1e6], ids=["gram", "product"])
def test_inner_products_with_a_direction_equal_brute_force(factor, monkeypatch):
  """ghost_sums(direction=d) gives <g_i, d> per example from the same backward pass: every
  layer kind of the zoo, a scanned stack and a tied table, both forms, garbage rows."""
  monkeypatch.setitem(taps.GRAM_COST_FACTOR, "cpu", factor)
  loss_fn, params, batch = norm_zoo_setup()
  zoo_mask = np.array([True, True, False, True, False, True, True])
  zoo = (loss_fn, params, dict(batch, image=batch["image"].at[~zoo_mask].set(1e3)), zoo_mask)
  params, batch = scanned_setup()
  scan_mask = np.array([True, False, True, True, True, False])
  scanned = (scanned_loss, params, dict(batch, ids=batch["ids"].at[~scan_mask].set(10**6)), scan_mask)
  for loss_fn, params, batch, mask in (zoo, scanned):
    d = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape), params)
    grad_one = jax.jit(jax.grad(lambda p, e: loss_fn(p, e)[0]))
    expected = [
        float(np.dot(np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in jax.tree.leaves(grad_one(params, jax.tree.map(lambda x: x[i : i + 1], batch)))]),
                     np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(d)]))) if real else 0.0
        for i, real in enumerate(mask)
    ]
    got = jax.jit(lambda p, b: taps.ghost_sums(loss_fn, p, b, jnp.asarray(mask), direction=d).inner_products)(params, batch)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


# --------------------------------------------------------------------------- sum_ip about the batch's own mean


def tied_rows_loss(p, batch):
  """A table looked up, then read by a product with its rows as the contracting axis ("C")."""
  h = p["table"][batch["ids"]]  # (B, T, D)
  weights = jax.nn.softmax(jnp.tanh(h @ p["mix"]))  # (B, T, V)
  return jnp.sum((weights @ p["table"]) ** 2, axis=(1, 2))


def test_tied_table_looked_up_through_a_transpose_falls_back_and_is_exact():
  """A lookup that reads the table transposed (stored (D, V)) is not tied to the product that
  reads it as stored: its rows are not the leaf's; per-example copies, exact."""
  k = jax.random.split(jax.random.key(14), 3)
  params = {"table_t": jax.random.normal(k[0], (4, 9)), "w": jax.random.normal(k[1], (4, 4)) / 2}

  def loss_fn(p, batch):
    h = jnp.tanh(p["table_t"].T[batch["ids"]] @ p["w"])
    return -jnp.sum(jax.nn.log_softmax(h @ p["table_t"])[..., 0], -1)

  batch = {"ids": jax.random.randint(k[2], (5, 3), 0, 9)}
  assert leaf_forms(loss_fn, params, batch)["['table_t']"] == "per-example fallback"
  assert_ghost_matches(loss_fn, params, batch)


@pytest.mark.parametrize("factor", [1e-6, 1e6], ids=["gram", "product"])
def test_sum_ip_about_the_batch_mean_comes_from_the_same_pass_for_every_layer_kind(factor, monkeypatch):
  """Without chunks, gradient_stats' sum_ip = Σ_i <g_i, ḡ>² takes no JVP pass (jvp_sum_ip
  fails the test if called) for ghost, exact and auto, and equals brute force: every layer
  kind of the zoo, a scanned stack, a position table, a table tied as "F" (a head) and as
  "C", both lookup forms with repeated ids; garbage in the masked rows."""
  from divebatch_jax.stats import kernel

  monkeypatch.setitem(taps.GRAM_COST_FACTOR, "cpu", factor)
  monkeypatch.setattr(kernel, "jvp_sum_ip", lambda *args: pytest.fail("a JVP pass ran"))
  loss_fn, params, batch = norm_zoo_setup()
  zoo_mask = np.array([True, True, False, True, False, True, True])
  cases = [(loss_fn, params, dict(batch, image=batch["image"].at[~zoo_mask].set(1e3)), zoo_mask)]
  params, batch = scanned_setup()
  scan_mask = np.array([True, False, True, True, True, False])
  garbage_ids = dict(batch, ids=batch["ids"].at[~scan_mask].set(10**6))
  cases.append((scanned_loss, params, garbage_ids, scan_mask))
  tied = {"table": params["table"], "mix": jax.random.normal(jax.random.key(15), (4, 9)) / 2}
  assert "tied" in taps.trace_plan(tied_rows_loss, tied, batch).describe()["['table']"]
  cases.append((tied_rows_loss, tied, garbage_ids, scan_mask))
  token_loss, token_params = nnx_loss(TokenModel(nnx.Rngs(0)), 3)
  k1, k2 = jax.random.split(jax.random.key(3))
  ids = jnp.stack([jax.random.randint(k1, (7, 6), 0, 60), jax.random.randint(k2, (7, 6), 0, 5)], -1)
  ids = ids.at[0, :3, 0].set(17).at[~zoo_mask].set(10**6)
  cases.append((token_loss, token_params, labelled(ids, 3), zoo_mask))
  for loss_fn, params, batch, mask in cases:
    ref = brute_force(loss_fn, params, batch, mask)
    records = jax.jit(lambda p, b: {m: gradient_stats(loss_fn, p, b, mask, method=m)[2] for m in ("ghost", "exact", "auto")})(params, batch)
    for method, record in records.items():
      np.testing.assert_allclose(float(record.sum_ip), ref["sum_ip"], rtol=1e-5, err_msg=method)
    assert_ghost_matches(loss_fn, params, batch, mask)


@pytest.mark.parametrize("setup", ["zoo", "scanned"])
def test_product_form_in_chunks_over_the_batch_equals_brute_force(setup, monkeypatch):
  """On the CPU a product-form layer with large per-example gradients forms them a chunk of
  examples at a time in a loop (here 3 a chunk: 7 rows in 3 chunks, the last padded; 6 in 2
  with the scanned stack): its squared norms, summed gradient and <g_i, ḡ> (a tied table's
  both uses included) are still exact, and garbage in masked rows counts nowhere."""
  monkeypatch.setitem(taps.GRAM_COST_FACTOR, "cpu", 1e6)
  chunked = []
  monkeypatch.setattr(ghost_sums_module, "_chunk_size", lambda batch, size, loop, linked: chunked.append(loop) or 3)
  if setup == "zoo":
    loss_fn, params, batch = norm_zoo_setup()
    mask = np.array([True, True, False, True, False, True, True])
    batch = dict(batch, image=batch["image"].at[~mask].set(1e3))
  else:
    loss_fn, (params, batch) = scanned_loss, scanned_setup()
    mask = np.array([True, False, True, True, True, False])
    batch = dict(batch, ids=batch["ids"].at[~mask].set(10**6))
  ref = brute_force(loss_fn, params, batch, mask)
  for about_mean in (False, True):  # with <g_i, ḡ>: from (Ȳ_i, X_i), the gradients never all formed
    ghost = jax.jit(lambda p, x: taps.ghost_sums(loss_fn, p, x, jnp.asarray(mask), about_mean=about_mean))
    sums = ghost(params, batch)
    assert chunked and all(chunked)  # every product layer ran in chunks (on the CPU)
    np.testing.assert_allclose(sums.sq_norms, ref["sq_norms"], rtol=1e-5, atol=1e-12)
    sum_g = np.concatenate([np.ravel(x) for x in jax.tree.leaves(sums.sum_g)])
    np.testing.assert_allclose(sum_g, ref["sum_g"], rtol=1e-5, atol=1e-5 * np.abs(ref["sum_g"]).max())
    if about_mean:
      inner = ref["inner_products"]
      np.testing.assert_allclose(sums.inner_products, inner, rtol=1e-5, atol=1e-5 * np.abs(inner).max())


def test_chunks_over_the_batch_hold_about_the_target_bytes_and_pad_less_than_a_row_each():
  """The CPU loop over the batch: no loop for small gradients, off the CPU, or where one
  chunk would hold the batch; otherwise chunks of at most the target size (at least one
  example), as even as their count allows (the last one padded by fewer rows than chunks)."""
  example = 65536  # a (256, 256) kernel: 256 KiB per example
  assert taps._chunk_size(16, example, True, False) is None  # 4 MiB in all: under the threshold
  assert taps._chunk_size(256, example, False, False) is None
  assert taps._chunk_size(256, 4 * 2**20, True, False) == 1  # 16 MiB an example: one at a time
  assert taps._chunk_size(256, example, True, True) is None  # 64 MiB kept for <G_i, ḡ>
  assert taps._chunk_size(1024, example, True, True) == 4
  for batch in (33, 100, 128, 255, 256, 257, 1000):
    chunk = taps._chunk_size(batch, example, True, False)
    count = -(-batch // chunk)
    assert chunk <= taps._CHUNK_BYTES // (4 * example) and count * chunk - batch < count, (batch, chunk)


@pytest.mark.parametrize(
    "lhs_shape, rhs_shape, dims",
    [
        ((1, 5, 4, 3), (1, 6, 4, 3), (((3,), (3,)), ((0, 2), (0, 2)))),  # "bqhd,bkhd->bhqk" at b = 1
        ((1, 4, 5, 6), (1, 6, 4, 3), (((3,), (1,)), ((0, 1), (0, 2)))),  # "bhqk,bkhd->bhqd" at b = 1
        ((2, 1, 5), (1, 2, 5, 3), (((2,), (2,)), ((1, 0), (0, 1)))),  # a unit pair first, elsewhere in lhs
        ((2, 1, 5), (2, 1, 5, 3), (((2,), (2,)), ((0, 1), (0, 1)))),  # a unit pair second
        ((1, 5), (1, 5), (((1,), (1,)), ((0,), (0,)))),  # every batch dim a unit one
        ((3, 5), (3, 5, 2), (((1,), (1,)), ((0,), (0,)))),  # no unit batch dim: unchanged
    ],
)
def test_dot_without_unit_batch_dims_equals_the_dot_general_it_replaces(lhs_shape, rhs_shape, dims):
  """The walk re-binds a dot_general whose batch dims of size 1 (one example's batch of
  one) are squeezed out (XLA:CPU otherwise lays the vmapped attention out with extra
  copies): same values and shape as lax.dot_general, alone and vmapped."""
  kl, kr = jax.random.split(jax.random.key(0))
  lhs = jax.random.normal(kl, (4, *lhs_shape))
  rhs = jax.random.normal(kr, (4, *rhs_shape))
  eqn = jax.make_jaxpr(lambda a, b: jax.lax.dot_general(a, b, dims))(lhs[0], rhs[0]).jaxpr.eqns[0]
  want = jax.vmap(lambda a, b: jax.lax.dot_general(a, b, dims))(lhs, rhs)
  got = jax.vmap(lambda a, b: taps._bind(eqn, [a, b])[0])(lhs, rhs)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(taps._bind(eqn, [lhs[0], rhs[0]])[0], want[0], rtol=1e-6, atol=1e-6)
