"""The training engine: one fused call per step (GPU/TPU) and accumulate + apply calls (CPU)
give the same run; nothing compiles after the first epoch; policies' sizes fill whole
micro-batches."""

import functools
import json

import pytest

from conftest import run_records
from divebatch_jax.train import loop, main
from divebatch_jax.train.config import TrainConfig
from divebatch_jax.train.methods import build_policy

ARGS = [
    "--dataset", "synthetic", "--num-examples", "300", "--num-test-examples", "100",
    "--model", "mlp", "--epochs", "4", "--batch-size", "8", "--max-batch-size", "64",
    "--device-batch", "16", "--resize-every", "2", "--delta", "0.5", "--lr", "0.1",
]
SAME = ("batch_size", "next_batch_size", "diversity", "requested_batch_size", "train_loss", "test_loss",
        "test_accuracy", "steps", "padding_fraction")


@pytest.mark.slow
def test_fused_single_call_steps_equal_accumulated_steps(tmp_path, monkeypatch):
  assert main(ARGS + ["--method", "divebatch", "--out", str(tmp_path / "calls")]) == 0
  monkeypatch.setattr(loop, "TrainStep", functools.partial(loop.TrainStep, fuse=True))
  assert main(ARGS + ["--method", "divebatch", "--out", str(tmp_path / "fused")]) == 0
  calls, fused = run_records(tmp_path / "calls"), run_records(tmp_path / "fused")
  assert len({r["batch_size"] for r in calls}) > 1  # steps of one and of several micro-batches
  for a, b in zip(calls, fused):
    for key in SAME:
      if isinstance(a[key], float):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
      else:
        assert b[key] == a[key], key


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adabatch", "divebatch", "norm-test", "inner-product"])
def test_nothing_compiles_on_the_critical_path_after_the_first_epoch(method, tmp_path):
  """No epoch after the first waits on a compile inside its steps, and an executable is
  compiled once: an epoch whose layout and variant (plain / instrumented) an earlier
  epoch ran compiles nothing (the CPU compiles each epoch's executables before it)."""
  out = tmp_path / method
  assert main(ARGS + ["--method", method, "--growth-every", "1", "--out", str(out)]) == 0
  records = run_records(out)
  assert len({r["batch_size"] for r in records}) > 1, "the batch size never changed"
  config = TrainConfig(**json.loads((out / "config.json").read_text()))
  policy = build_policy(config)
  seen = set()
  for epoch, r in enumerate(records):
    variant = (r["batch_size"], bool(policy.needs_stats(epoch)))
    if epoch > 0:
      assert r["compile_stall_s"] == 0.0, r
      if variant in seen or policy.decision_steps:  # within-epoch deciders compile all first
        assert r["compilations"] == 0, r
    seen.add(variant)
    assert r["compile_s"] >= 0.0


def test_run_equals_the_accumulate_apply_loop_for_several_micro_batches():
  """``step.run`` on a batch of K = 3 micro-batches (fused call or not) gives the state and
  output of accumulate per micro-batch + apply, with statistics and the inner products."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import divebatch_jax as dbj
  from divebatch_jax import data, policies

  rng = np.random.default_rng(0)
  source = data.ArraySource({"x": rng.normal(size=(40, 5)).astype(np.float32), "y": rng.integers(0, 3, 40)}, num_classes=3)
  params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3)}

  def loss_fn(p, batch):
    return optax.softmax_cross_entropy_with_integer_labels(batch["x"] @ p["w"] + p["b"], batch["y"])

  def make(fuse):
    policy = policies.inner_product_test(0.5, 0.5, max_batch_size=40, every=1)
    tx = dbj.adaptive_batch(optax.sgd(0.1), policy, num_examples=40, base_batch_size=20)
    return dbj.train_step(loss_fn, tx, policy=policy, method="exact", fuse=fuse)

  with data.Pipeline(source, ladder=data.bucket_ladder(8, 8), seed=0, prefetch=0) as pipeline:
    batch = pipeline.next_batch(20)  # 20 rows as K = 3 micro-batches of 8 (7, 7, 6 real)
  assert len(batch.micro_batches) == 3
  reference = make(False)
  state = reference.init(params)
  sums = None
  for micro, mask in batch.micro_batches:
    sums, _ = reference.accumulate(state, micro, mask, sums, stats=True)
  sum_ip = sum(reference.inner_products(state, sums, micro, mask) for micro, mask in batch.micro_batches)
  expected, expected_out = reference.apply(state, sums, sum_ip=sum_ip, stats=True)
  for fuse in (False, True):
    step = make(fuse)
    got, out = step.run(step.init(params), batch, stats=True)
    np.testing.assert_allclose(out.loss, expected_out.loss, rtol=1e-6)
    assert int(out.count) == int(expected_out.count) == 20
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-7)


def _tiny_classifier(seed: int, rows: int):
  """``(source, params, loss_fn)``: a tanh layer with a bias, 3 classes, 5 features."""
  import jax.numpy as jnp
  import numpy as np
  import optax

  from divebatch_jax import data

  rng = np.random.default_rng(seed)
  source = data.ArraySource({"x": rng.normal(size=(rows, 5)).astype(np.float32), "y": rng.integers(0, 3, rows)}, num_classes=3)
  params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3)}

  def loss_fn(p, batch):
    return optax.softmax_cross_entropy_with_integer_labels(jnp.tanh(batch["x"] @ p["w"]) + p["b"], batch["y"])

  return source, params, loss_fn


def _keeps(field: str):
  """A transformation whose state is ``field`` of the record the step passed last."""
  import jax.numpy as jnp
  import optax

  def update(updates, state, params=None, *, stats=None, **extra):
    return updates, state if stats is None else getattr(stats, field)

  return optax.GradientTransformationExtraArgs(lambda params: jnp.float32(jnp.nan), update)


@pytest.mark.parametrize("method", ["exact", "ghost"])
def test_a_step_of_one_micro_batch_takes_sum_ip_from_the_same_pass(method, monkeypatch):
  """A step of one micro-batch (6 real rows of 8) takes sum_ip from the pass that forms its
  sums: accumulate(..., only=True) gives the JVP's Σ_i <g_i, ḡ>², and step.run (accumulate
  + apply, or one fused call), the fused call on a (B,) or (1, m) layout give the state of
  the JVP path (sum_ip included: a transformation keeps it), with no JVP pass (jvp_sum_ip
  fails the test if called)."""
  import jax
  import numpy as np
  import optax

  import divebatch_jax as dbj
  from divebatch_jax import data, policies
  from divebatch_jax.stats import kernel

  source, params, loss_fn = _tiny_classifier(1, 40)

  def make(fuse):
    policy = policies.inner_product_test(0.5, 0.5, max_batch_size=40, every=1)
    tx = optax.chain(dbj.adaptive_batch(optax.sgd(0.1), policy, num_examples=40, base_batch_size=6), _keeps("sum_ip"))
    return dbj.train_step(loss_fn, tx, policy=policy, method=method, fuse=fuse)

  with data.Pipeline(source, ladder=data.bucket_ladder(8, 8), seed=0, prefetch=0) as pipeline:
    batch = pipeline.next_batch(6)
  ((micro, mask),) = batch.micro_batches
  assert mask.shape == (8,) and int(mask.sum()) == 6
  reference = make(False)
  state = reference.init(params)
  sums, _ = reference.accumulate(state, micro, mask, stats=True)
  jvp = reference.inner_products(state, sums, micro, mask)
  monkeypatch.setattr(kernel, "jvp_sum_ip", lambda *args: pytest.fail("a JVP pass ran"))
  same_pass, _ = reference.accumulate(state, micro, mask, stats=True, only=True)
  np.testing.assert_allclose(float(same_pass.sum_ip), float(jvp), rtol=1e-5)
  expected, expected_out = reference.apply(state, sums, sum_ip=jvp, stats=True)  # donates state
  assert float(expected.opt_state[1]) == float(jvp) > 0.0
  layouts = {"fused (B,)": (micro, mask), "fused (1, m)": jax.tree.map(lambda x: x[None], (micro, mask))}
  for name, fuse in (("run, accumulate + apply", False), ("run, fused", True), *((layout, True) for layout in layouts)):
    step = make(fuse)
    if name in layouts:
      got, out = step(step.init(params), *layouts[name], stats=True)
    else:
      got, out = step.run(step.init(params), batch, stats=True)
    np.testing.assert_allclose(out.loss, expected_out.loss, rtol=1e-6, err_msg=name)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-7, err_msg=name)


def test_a_step_of_one_micro_batch_groups_the_micro_batch_estimator_within_it():
  """The micro-batch estimator on a step of one micro-batch run as accumulate + apply (the
  CPU's way) forms its groups within the micro-batch, as the fused call does: both steps
  give the policy the same record, whose sum_sq is the estimator's over 4 strided groups
  of 4 rows (computed here from the groups' mean gradients), not the one-group N·||ḡ||²."""
  import jax
  import numpy as np
  import optax

  import divebatch_jax as dbj
  from divebatch_jax import data, policies

  source, params, loss_fn = _tiny_classifier(2, 32)

  def run(fuse):
    policy = policies.divebatch(0.5, max_batch_size=32, resize_every=1)
    tx = optax.chain(dbj.adaptive_batch(optax.sgd(0.1), policy, num_examples=32, base_batch_size=16), _keeps("sum_sq"))
    step = dbj.train_step(loss_fn, tx, policy=policy, method="microbatch", chunk_size=4, fuse=fuse)
    with data.Pipeline(source, ladder=data.bucket_ladder(16, 16), seed=0, prefetch=0) as pipeline:
      batch = pipeline.next_batch(16)
    state, _ = step.run(step.init(params), batch, stats=True)
    return float(state.opt_state[1]), batch

  accumulated, batch = run(False)
  fused, _ = run(True)
  ((rows, _),) = batch.micro_batches
  grads = jax.vmap(jax.grad(lambda p, x, y: loss_fn(p, {"x": x[None], "y": y[None]})[0]), in_axes=(None, 0, 0))(
      params, np.asarray(rows["x"]), np.asarray(rows["y"]))
  g = np.concatenate([np.asarray(v, np.float64).reshape(16, -1) for v in jax.tree.leaves(grads)], axis=1)
  means = np.stack([g[j::4].mean(0) for j in range(4)])  # row i joins group i mod 4
  gbar = g.mean(0)
  trace = 4 * ((means - gbar) ** 2).sum() / 3
  expected = 16 * (gbar**2).sum() + 15 * trace
  np.testing.assert_allclose(fused, expected, rtol=1e-4)
  np.testing.assert_allclose(accumulated, expected, rtol=1e-4)


def test_init_leaves_the_callers_params_usable():
  import jax.numpy as jnp
  import optax

  import divebatch_jax as dbj
  from divebatch_jax import policies

  params = {"w": jnp.ones((3,))}
  loss_fn = lambda p, batch: (batch["x"] @ p["w"]) ** 2
  policy = policies.constant()
  tx = dbj.adaptive_batch(optax.sgd(0.1), policy, num_examples=4, base_batch_size=4)
  step = dbj.train_step(loss_fn, tx, policy=policy)
  batch = {"x": jnp.ones((4, 3))}
  for _ in range(2):  # two experiments from the same initial weights
    state, _ = step(step.init(params), batch, stats=False)
    assert float(state.params["w"][0]) != 1.0
  assert float(params["w"].sum()) == 3.0  # not deleted by the donated step


@pytest.mark.slow
def test_batch_norm_micro_batch_statistics_ignore_padded_rows():
  """A BatchNorm step's loss, gradient, statistics and running averages are the same whether
  its padded rows hold zeros or garbage: padding never enters BatchNorm's batch statistics
  nor the record."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import divebatch_jax as dbj
  from divebatch_jax import policies
  from divebatch_jax.train import models

  model = models.create_model("cnn", input_shape=(8, 8, 1), num_classes=4, seed=0, norm="batch")
  graphdef, params, rest = models.split_model(model)
  policy = policies.divebatch(0.5, 64, resize_every=1)
  tx = dbj.adaptive_batch(optax.sgd(0.1), policy, num_examples=21, base_batch_size=21)  # one step: the epoch, then a decision
  step = dbj.train_step(models.aux_loss_fn(graphdef), tx, policy=policy, method="microbatch", has_aux=True)
  rng = np.random.default_rng(0)
  real = 21
  x = rng.normal(size=(24, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 4, 24).astype(np.int32)
  mask = np.arange(24) < real
  results = []
  for fill in (0.0, 1e4):
    x_padded = x.copy()
    x_padded[~mask] = fill
    state = step.init(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, rest))
    state, out = step(state, {"x": jnp.asarray(x_padded), "y": jnp.asarray(y)}, jnp.asarray(mask), stats=True)
    summary = dbj.batch_state_summary(state.opt_state)
    results.append((float(out.loss), int(out.count), summary["statistic"], state))
  (loss_a, count_a, stat_a, state_a), (loss_b, count_b, stat_b, state_b) = results
  assert count_a == count_b == real
  assert loss_a == pytest.approx(loss_b, rel=1e-6)
  assert np.isfinite(stat_a) and stat_a == pytest.approx(stat_b, rel=1e-5)
  for a, b in zip(jax.tree.leaves((state_a.params, state_a.aux)), jax.tree.leaves((state_b.params, state_b.aux))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_default_job_rules_compile_at_most_ten_executables_per_method(tmp_path):
  """The default job's SGD and AdaBatch (digits MLP, b0 16 -> 512, a decision every 3
  epochs; 16 epochs reach 512) compile at most 10 executables each, after the job's
  warm-up: no gather executable per micro-batch size on the CPU (NumPy prepares them),
  one accumulate per layout, one apply, one evaluation. AdaBatch compiles every layout
  its schedule reaches before its first epoch: no epoch after a resize compiles."""
  out = tmp_path / "job"
  flags = ["--dataset", "digits", "--model", "mlp", "--batch-size", "16", "--max-batch-size", "512",
           "--lr", "0.05", "--resize-every", "3", "--growth-every", "3", "--epochs", "16", "--device-batch", "512"]
  assert main(flags + ["--compare", "sgd,adabatch", "--out", str(out)]) == 0
  for method in ("sgd", "adabatch"):
    summary = json.loads((out / method / "summary.json").read_text())
    assert 1 <= summary["compilations"] <= 10, (method, summary["compilations"])
  records = run_records(out / "adabatch")
  assert [r["batch_size"] for r in records][-1] == 512  # every layout 16 .. 512 was used
  assert [r["compilations"] for r in records[1:]] == [0] * (len(records) - 1)
  assert records[0]["compilations"] >= 6  # 16, 32, 64, 128, 256, 512: all before epoch 1
