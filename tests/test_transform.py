"""Contract tests of adaptive_batch, in the manner of optax's contrib common tests."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import divebatch_jax as dbj
from divebatch_jax import policies

N = 40  # examples per epoch in these tests


def loss_fn(w, batch):
  return 0.5 * (batch["x"] @ w["w"] + w["b"] - batch["y"]) ** 2


def _batch(size, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(size, 3)).astype(np.float32)
  return {"x": jnp.asarray(x), "y": jnp.asarray(x.sum(1) + rng.normal(size=size).astype(np.float32))}


PARAMS = {"w": jnp.zeros(3), "b": jnp.zeros(())}

ALL_POLICIES = {
    "constant": lambda: policies.constant(),
    "adabatch": lambda: policies.adabatch(max_batch_size=32, every=1),
    "sebs": lambda: policies.sebs(2, 1, 32),
    "divebatch": lambda: policies.divebatch(0.5, 32, resize_every=1),
    "divebatch_ema": lambda: policies.divebatch(0.5, 32, resize_every=1, estimator="ema"),
    "norm_test": lambda: policies.norm_test(0.5, 32),
    "inner_product": lambda: policies.inner_product_test(0.5, 1.0, max_batch_size=32),
    "noise_scale": lambda: policies.noise_scale(1.0, 0.9, max_batch_size=32),
}


def _tx(policy, lr_rule="linear", inner=None):
  return dbj.adaptive_batch(
      inner or optax.sgd(0.1), policy, num_examples=N, base_batch_size=4, lr_rule=lr_rule
  )


def _stats_step(tx):
  @jax.jit
  def step(params, state, batch, mask):
    _, grad, stats = dbj.gradient_stats(loss_fn, params, batch, mask)
    updates, state = tx.update(grad, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  return step


@pytest.mark.parametrize("name", sorted(ALL_POLICIES))
def test_no_recompilation_after_first_update(name):
  tx = _tx(ALL_POLICIES[name]())
  step = _stats_step(tx)
  params, state = PARAMS, tx.init(PARAMS)
  batch, mask = _batch(8), jnp.arange(8) < 6
  with dbj.CompileCounter() as compiles:
    for _ in range(4):
      params, state = step(params, state, batch, mask)
    jax.block_until_ready(params)
  assert compiles.count_of("step") == 1


@pytest.mark.parametrize("name", sorted(ALL_POLICIES))
def test_state_is_stable_under_lax_cond(name):
  tx = _tx(ALL_POLICIES[name]())
  state = tx.init(PARAMS)
  _, grad, stats = dbj.gradient_stats(loss_fn, PARAMS, _batch(8))

  @jax.jit
  def maybe_update(pred, state):
    return jax.lax.cond(pred, lambda s: tx.update(grad, s, PARAMS, stats=stats)[1], lambda s: s, state)

  new_state = maybe_update(True, state)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
    assert a.shape == b.shape and a.dtype == b.dtype


def test_extra_args_in_chain_and_for_inner():
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      _tx(policies.divebatch(0.5, 32, resize_every=1)),
  )
  state = tx.init(PARAMS)
  _, grad, stats = dbj.gradient_stats(loss_fn, PARAMS, _batch(8))
  updates, state = tx.update(grad, state, PARAMS, stats=stats, unrelated_extra=3)
  assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)
  # Extra args reach an inner transformation that wants them (value/grad/value_fn for a linesearch).
  inner = optax.chain(optax.sgd(0.1), optax.scale_by_backtracking_linesearch(max_backtracking_steps=3))
  tx2 = _tx(policies.constant(), inner=inner)
  state2 = tx2.init(PARAMS)
  batch = _batch(8)
  value_fn = lambda p: jnp.mean(loss_fn(p, batch))
  value, grad = jax.value_and_grad(value_fn)(PARAMS)
  updates, _ = tx2.update(grad, state2, PARAMS, value=value, grad=grad, value_fn=value_fn)
  assert float(value_fn(optax.apply_updates(PARAMS, updates))) <= float(value)


def test_inject_hyperparams():
  tx = optax.inject_hyperparams(dbj.adaptive_batch, static_args=("lr_rule",))(
      inner=optax.sgd(0.1), policy=policies.constant(), num_examples=N, base_batch_size=4,
      lr_rule="linear",
  )
  state = tx.init(PARAMS)
  state.hyperparams["base_batch_size"] = jnp.asarray(2)  # b0 halved: linear scale doubles
  grad = jax.tree.map(jnp.ones_like, PARAMS)
  updates, state = jax.jit(tx.update)(grad, state, PARAMS)
  updates, state = jax.jit(tx.update)(grad, state, PARAMS)
  np.testing.assert_allclose(updates["w"], -0.1 * 2.0 * np.ones(3), rtol=1e-6)
  assert dbj.current_batch_size(state) == 4


def test_dtype_kept_for_bf16_params():
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
  tx = _tx(policies.divebatch(0.5, 32, resize_every=1))
  state = tx.init(params)
  _, grad, stats = dbj.gradient_stats(loss_fn, params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), _batch(8)))
  updates, _ = jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))(grad, state, params, stats)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))


def test_epoch_counting_without_stats_follows_the_pipeline_contract():
  # n = 40, b = 12: steps of 12, 12, 12, 4, then the next epoch.
  tx = _tx(policies.constant())
  state = tx.init(PARAMS)
  grad = jax.tree.map(jnp.zeros_like, PARAMS)
  tx = dbj.adaptive_batch(optax.sgd(0.1), policies.constant(), num_examples=N, base_batch_size=12)
  state = tx.init(PARAMS)
  seen = []
  for _ in range(5):
    _, state = tx.update(grad, state, PARAMS)
    s = dbj.find_state(state)
    seen.append((int(s.epoch), int(s.epoch_position), int(s.examples_seen)))
  assert seen == [(0, 12, 12), (0, 24, 24), (0, 36, 36), (1, 0, 40), (1, 12, 52)]


@pytest.mark.parametrize("lr_rule,factor", [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_lr_rule_scales_sgd_update_exactly(lr_rule, factor):
  # SEBS doubles b every epoch: 4 -> 8 -> 16; the update at b = 16 is -lr·rule(16/4)·grad.
  lr = 0.1
  tx = dbj.adaptive_batch(optax.sgd(lr), policies.sebs(2, 1, 64), num_examples=N, base_batch_size=4, lr_rule=lr_rule)
  state = tx.init(PARAMS)
  grad = {"w": jnp.asarray([0.5, -1.0, 2.0]), "b": jnp.asarray(0.25)}
  update = jax.jit(tx.update)
  while dbj.current_batch_size(state) < 16:
    updates, state = update(grad, state, PARAMS)
  updates, state = update(grad, state, PARAMS)
  scale = np.float32(factor)
  np.testing.assert_array_equal(updates["w"], -lr * grad["w"] * scale)
  np.testing.assert_array_equal(updates["b"], -lr * grad["b"] * scale)


def test_adascale_gain_matches_formula():
  tx = dbj.adaptive_batch(optax.sgd(1.0), policies.constant(), num_examples=10_000, base_batch_size=4, lr_rule="adascale")
  state = tx.init(PARAMS)
  _, grad, stats = dbj.gradient_stats(loss_fn, PARAMS, _batch(16))
  # Force b = 16 (S = 4) to read the gain the rule would apply there.
  s = dbj.find_state(state)._replace(batch_size=jnp.int32(16))
  _, s = tx.update(grad, s, PARAMS, stats=stats)
  trace, grad_sq = dbj.noise_components(stats)
  sigma_sq, mu_sq = float(trace) / 4, float(grad_sq)
  expected = (sigma_sq + mu_sq) / (sigma_sq / 4 + mu_sq)
  np.testing.assert_allclose(float(s.lr_scale), min(max(expected, 1.0), 4.0), rtol=1e-5)


def test_nnx_optimizer_update_with_stats():
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  tx = dbj.adaptive_batch(
      optax.sgd(0.05, momentum=0.9), policies.divebatch(1.0, 32, resize_every=1), num_examples=N, base_batch_size=4
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, params = nnx.split(model, nnx.Param)

  def model_loss(p, batch):
    return 0.5 * (nnx.merge(graphdef, p)(batch["x"])[:, 0] - batch["y"]) ** 2

  @nnx.jit
  def train_step(model, optimizer, batch):
    params = nnx.state(model, nnx.Param)
    loss, grads, stats = dbj.gradient_stats(model_loss, params, batch)
    optimizer.update(model, grads, stats=stats)
    return loss

  data = _batch(N, seed=4)
  losses = []
  for epoch in range(3):
    b = dbj.current_batch_size(optimizer.opt_state)
    for lo in range(0, N, b):
      losses.append(float(train_step(model, optimizer, jax.tree.map(lambda x: x[lo : lo + b], data))))
  summary = dbj.batch_state_summary(optimizer.opt_state)
  assert summary["epoch"] == 3 and summary["examples_seen"] == 3 * N
  assert summary["batch_size"] > 4  # δ = 1 asks for n·Δ̂ ≥ 1·Δ̂·n, above b0 here
  assert np.isfinite(summary["statistic"]) and losses[-1] < losses[0]


def test_orbax_round_trip_is_exact(tmp_path):
  tx = _tx(policies.divebatch(0.5, 32, resize_every=1, estimator="ema"), inner=optax.adam(1e-2))
  step = _stats_step(tx)
  params, state = PARAMS, tx.init(PARAMS)
  for _ in range(3):
    params, state = step(params, state, _batch(8), jnp.ones(8, bool))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
  checkpointer.wait_until_finished()
  target = {"params": params, "opt_state": tx.init(PARAMS)}
  restored = checkpointer.restore(tmp_path / "ckpt", target)
  assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves({"params": params, "opt_state": state})):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(a).dtype == np.asarray(b).dtype


def test_bad_arguments():
  with pytest.raises(ValueError, match="lr_rule"):
    dbj.adaptive_batch(optax.sgd(0.1), policies.constant(), num_examples=10, base_batch_size=2, lr_rule="cubic")
  with pytest.raises(ValueError, match="num_examples"):
    dbj.adaptive_batch(optax.sgd(0.1), policies.constant(), num_examples=0, base_batch_size=2)
  with pytest.raises(ValueError, match="base_batch_size"):
    dbj.adaptive_batch(optax.sgd(0.1), policies.constant(), num_examples=10, base_batch_size=2.5)
  with pytest.raises(TypeError, match="policy"):
    dbj.adaptive_batch(optax.sgd(0.1), "divebatch", num_examples=10, base_batch_size=2)
  with pytest.raises(ValueError, match="AdaptiveBatchState"):
    dbj.current_batch_size(optax.sgd(0.1).init(PARAMS))


# --------------------------------------------------------------------------- counting, rounding, limits


def test_count_keyword_counts_real_rows_and_drift_is_reported():
  """A loop without stats= passes count=; one that drops the last partial batch is told."""
  tx = dbj.adaptive_batch(optax.sgd(0.1), policies.constant(), num_examples=N, base_batch_size=12)
  grad = jax.tree.map(jnp.zeros_like, PARAMS)
  update = jax.jit(lambda g, s, c: tx.update(g, s, PARAMS, count=c))
  state = tx.init(PARAMS)
  for rows in (12, 12, 12, 4):  # every example once, the last step partial
    _, state = update(grad, state, rows)
  assert dbj.current_batch_size(state, epoch=1) == 12
  state = tx.init(PARAMS)
  for rows in (12, 12, 12):  # the last partial batch dropped
    _, state = update(grad, state, rows)
  with pytest.raises(ValueError, match=r"epoch drift: the loop starts epoch 1 but adaptive_batch counts epoch 0 at example 36"):
    dbj.current_batch_size(state, epoch=1)


def test_batch_sizes_round_the_rule_to_the_engines_sizes_and_keep_the_request():
  """DiveBatch asks for floor(δ·n·Δ̂); with batch_sizes the step gets the nearest size."""
  sizes = (4, 8, 16, 24, 32)
  policy = policies.divebatch(delta=1.0, max_batch_size=32, resize_every=1)
  tx = dbj.adaptive_batch(optax.sgd(0.1), policy, num_examples=N, base_batch_size=4, batch_sizes=sizes)
  step = _stats_step(tx)
  params, state = PARAMS, tx.init(PARAMS)
  batch = _batch(N)
  for start in range(0, N, 4):  # one epoch of b = 4
    part = jax.tree.map(lambda x: x[start : start + 4], batch)
    params, state = step(params, state, part, jnp.ones(4, bool))
  s = dbj.find_state(state)
  requested = float(s.requested)
  assert np.isfinite(requested) and requested > 4
  expected = min(sizes, key=lambda b: abs(np.log(b) - np.log(min(np.floor(requested), 32))))
  assert int(s.batch_size) == max(expected, 4)


def test_round_to_sizes_against_brute_force():
  sizes = (16, 32, 64, 128, 192, 256)
  for current in (16, 64, 100):
    for size in range(1, 300, 7):
      got = int(dbj.transform.round_to_sizes(jnp.int32(size), jnp.int32(current), sizes))
      nearest = min(sizes, key=lambda b: (abs(np.log(b) - np.log(size)), b))
      if size > current and nearest < current:
        nearest = next((b for b in sizes if b >= current), current)
      assert got == nearest, (size, current, got, nearest)


def test_batch_size_never_exceeds_the_data_set():
  """A rule asking for more than n examples gets n."""
  tx = dbj.adaptive_batch(optax.sgd(0.1), policies.sebs(4, 1, 4096), num_examples=N, base_batch_size=16)
  state, grad = tx.init(PARAMS), jax.tree.map(jnp.zeros_like, PARAMS)
  update = jax.jit(tx.update)
  for _ in range(6):
    _, state = update(grad, state, PARAMS)
  assert dbj.current_batch_size(state) == N


def test_default_lr_rule_is_none_and_summary_shows_the_effective_rate():
  inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05)
  tx = dbj.adaptive_batch(inner, policies.sebs(2, 1, 64), num_examples=N, base_batch_size=4)
  state, grad = tx.init(PARAMS), jax.tree.map(jnp.ones_like, PARAMS)
  update = jax.jit(tx.update)
  while dbj.current_batch_size(state) < 16:
    updates, state = update(grad, state, PARAMS)
  updates, state = update(grad, state, PARAMS)
  np.testing.assert_allclose(updates["w"], -0.05 * np.ones(3), rtol=1e-6)  # b grew 4x, rate unchanged
  summary = dbj.batch_state_summary(state)
  assert summary["learning_rate"] == pytest.approx(0.05) and summary["lr_scale"] == 1.0
  linear = dbj.adaptive_batch(inner, policies.constant(), num_examples=N, base_batch_size=4, lr_rule="linear")
  assert dbj.batch_state_summary(linear.init(PARAMS))["learning_rate"] == pytest.approx(0.05)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(base_batch_size=64), r"base_batch_size must be in \[1, 32\]"),
        (dict(base_batch_size=50, num_examples=40), r"base_batch_size must be in \[1, 32\]"),
        (dict(base_batch_size=8, num_examples=6), r"base_batch_size must be in \[1, 6\]"),
        (dict(batch_sizes=[4, 0]), "batch_sizes entry"),
    ],
)
def test_sizes_out_of_range_are_named(kwargs, match):
  args = dict(num_examples=N, base_batch_size=4) | kwargs
  with pytest.raises(ValueError, match=match):
    dbj.adaptive_batch(optax.sgd(0.1), policies.divebatch(0.1, 32), **args)


def test_lr_ramp_moves_the_scale_linearly_after_a_resize():
  """SEBS doubles b every epoch (4 -> 8) with the linear rule: the scale goes 1 -> 2 over 4 steps."""
  tx = dbj.adaptive_batch(optax.sgd(1.0), policies.sebs(2, 1, 64), num_examples=N, base_batch_size=4,
                          lr_rule="linear", lr_ramp_steps=4)
  state, grad = tx.init(PARAMS), jax.tree.map(jnp.ones_like, PARAMS)
  update = jax.jit(tx.update)
  scales = []
  for _ in range(16):
    _, state = update(grad, state, PARAMS)
    scales.append(float(dbj.find_state(state).lr_scale))
  # epoch 0: 10 steps of b = 4 (scale 1), epoch 1: 5 steps of b = 8 (scale 1 -> 2 over 4
  # steps), then b = 16 (2 -> 4).
  np.testing.assert_allclose(scales[:9], [1.0] * 9)  # scales[i]: the scale of step i + 1
  np.testing.assert_allclose(scales[9:16], [1.25, 1.5, 1.75, 2.0, 2.0, 2.5, 3.0], rtol=1e-6)
