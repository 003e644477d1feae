"""optax's contract for gradient transformations, over ``adaptive_batch``.

After ``optax/contrib/_common_test.py``: every policy × (sgd, sgd + momentum, adam),
composed with ``chain``, ``named_chain``, ``inject_hyperparams``, ``MultiSteps``,
``apply_if_finite``, ``transforms.partition`` and flax's ``nnx.Optimizer``. The
references are independent of the library: optax's own state classes (their field
names), the loop's own epoch counter and example count, and diversity computed here
from the records the test passed.
"""

import functools
import importlib
import inspect
import pkgutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import divebatch_jax as dbj
from divebatch_jax import policies
from divebatch_jax.transform import readers
from divebatch_jax.transform.schedule_decay import schedule_decay

N, B0 = 16, 4
PARAMS = {"w": jnp.zeros(3), "b": jnp.zeros(())}
_X = jnp.asarray(np.random.default_rng(0).normal(size=(N, 3)), jnp.float32)
_Y = jnp.asarray(np.random.default_rng(1).normal(size=N), jnp.float32)


def _loss(params, batch):
  return 0.5 * (batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2


POLICIES = {
    "constant": lambda: policies.constant(),
    "adabatch": lambda: policies.adabatch(2, 1, max_batch_size=N),
    "sebs": lambda: policies.sebs(2.0, 1, N),
    "by_epoch": lambda: policies.by_epoch([4, 8, 16]),
    "divebatch": lambda: policies.divebatch(1.0, N, resize_every=1),
    "divebatch_ema": lambda: policies.divebatch(1.0, N, resize_every=1, estimator="ema"),
    "norm_test": lambda: policies.norm_test(0.5, N),
    "inner_product_test": lambda: policies.inner_product_test(0.5, 1.0, max_batch_size=N),
    "noise_scale": lambda: policies.noise_scale(max_batch_size=N),
    "goodput": lambda: policies.goodput({4: 1.0, 8: 1.8, 16: 3.0}, max_batch_size=N),
    "linear_ramp": lambda: policies.linear_ramp(N, ramp_examples=3 * N),
    "seesaw": lambda: policies.seesaw(
        schedule_decay(optax.exponential_decay(0.1, 4, 0.5), peak=0.1), max_batch_size=N),
}
INNERS = {
    "sgd": lambda: optax.sgd(0.05),
    "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adam": lambda: optax.adam(0.05),
}


@functools.cache
def _optax_field_names() -> frozenset[str]:
  """Every field and class name of a NamedTuple state that optax defines."""
  names = set()
  for module in pkgutil.walk_packages(optax.__path__, "optax."):
    if "test" in module.name:
      continue
    try:
      loaded = importlib.import_module(module.name)
    except Exception:  # optional dependencies of optax's contrib
      continue
    for value in vars(loaded).values():
      if inspect.isclass(value) and issubclass(value, tuple) and hasattr(value, "_fields"):
        names.update(value._fields)
        names.add(value.__name__)
  return frozenset(names)


def _our_names(tree) -> set[str]:
  """Field and class names of the NamedTuples in ``tree`` outside the inner optimizer's state."""
  names = set()
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    names.add(type(tree).__name__)
    for field in tree._fields:
      if field != "inner_state":
        names.add(field)
        names |= _our_names(getattr(tree, field))
  elif isinstance(tree, (list, tuple)):
    for item in tree:
      names |= _our_names(item)
  elif isinstance(tree, dict):
    for item in tree.values():
      names |= _our_names(item)
  return names


def _tx(policy="divebatch", inner="sgd", **kwargs):
  inner = INNERS[inner]() if isinstance(inner, str) else inner
  return dbj.adaptive_batch(inner, POLICIES[policy](), num_examples=N, base_batch_size=B0, **kwargs)


def _stats_step(tx, *, nan_at=None):
  """A jitted step passing this batch's statistics; ``nan_at`` poisons that step's gradient."""

  @jax.jit
  def step(params, state, x, y, poison):
    _, grad, stats = dbj.gradient_stats(_loss, params, {"x": x, "y": y})
    poison_tree = lambda t: jax.tree.map(lambda a: jnp.where(poison, jnp.nan, a), t)
    grad, stats = poison_tree(grad), stats._replace(sum_g=poison_tree(stats.sum_g))
    updates, state = tx.update(grad, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  return step


def _run(tx, epochs, *, nan_step=None):
  """Epochs over the N examples at the transformation's batch size; the loop's own
  (epoch, examples) count, and the state."""
  params, state, step = PARAMS, tx.init(PARAMS), _stats_step(tx)
  steps = examples = 0
  for epoch in range(epochs):
    b = dbj.current_batch_size(state, epoch=epoch)
    for start in range(0, N, b):
      params, state = step(params, state, _X[start:start + b], _Y[start:start + b], steps == nan_step)
      steps, examples = steps + 1, examples + min(b, N - start)
  return params, state, examples


# ------------------------------------------------------------------ names


def test_optax_field_names_are_collected():
  names = _optax_field_names()
  assert {"count", "trace", "mu", "nu", "hyperparams", "notfinite_count"} <= names


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_no_state_name_shadows_an_optax_state_name(policy):
  state = _tx(policy, "adam").init(PARAMS)
  clash = _our_names(state) & _optax_field_names()
  assert not clash, f"{policy}: {sorted(clash)}"


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("inner,names", [("adam", ("count", "mu", "nu")), ("sgd_momentum", ("trace",))])
def test_tree_get_finds_the_inner_optimizers_value(policy, inner, names):
  tx = _tx(policy, inner)
  _, _, stats = dbj.gradient_stats(_loss, PARAMS, {"x": _X[:B0], "y": _Y[:B0]})
  _, state = tx.update(jax.tree.map(jnp.ones_like, PARAMS), tx.init(PARAMS), PARAMS, stats=stats)
  inner_state = dbj.find_state(state).inner_state[0]  # ScaleByAdamState / TraceState
  for name in names:
    found, expected = optax.tree.get(state, name), getattr(inner_state, name)
    assert jax.tree.structure(found) == jax.tree.structure(expected), name
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(found), jax.tree.leaves(expected)))
  if inner == "adam":
    assert int(optax.tree.get(state, "count")) == 1


def test_tree_get_learning_rate_of_injected_inner_and_tree_set():
  tx = _tx("divebatch", optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9))
  state = tx.init(PARAMS)
  assert float(optax.tree.get(state, "learning_rate")) == pytest.approx(0.1)
  state = optax.tree.set(state, learning_rate=jnp.float32(0.02))
  assert float(dbj.find_state(state).inner_state.hyperparams["learning_rate"]) == pytest.approx(0.02)


# ------------------------------------------------------------------ running under each combinator


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_under_chain_keeps_epochs_and_lowers_the_loss(policy):
  tx = optax.chain(optax.clip_by_global_norm(10.0), _tx(policy, "sgd_momentum"))
  params, state, examples = _run(tx, 3)
  s = dbj.find_state(state)
  assert (int(s.epoch), int(s.epoch_position), int(s.examples_seen)) == (3, 0, examples) == (3, 0, 3 * N)
  full = {"x": _X, "y": _Y}
  assert float(jnp.mean(_loss(params, full))) < float(jnp.mean(_loss(PARAMS, full)))


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_named_chain_and_state_shape_stable_for_scan(inner):
  tx = optax.named_chain(("clip", optax.clip(1.0)), ("adaptive", _tx("divebatch", inner)))
  state = tx.init(PARAMS)
  _, _, stats = dbj.gradient_stats(_loss, PARAMS, {"x": _X[:B0], "y": _Y[:B0]})
  grad = dbj.mean_gradient(stats)
  shape_of = lambda s: jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), s)
  after = jax.eval_shape(lambda s: tx.update(grad, s, PARAMS, stats=stats)[1], state)
  assert jax.tree.structure(after) == jax.tree.structure(state)
  assert shape_of(after) == shape_of(state)


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_divebatch_grows_under_every_inner_and_matches_brute_force_diversity(inner):
  tx = _tx("divebatch", inner)
  params, state, step, records = PARAMS, tx.init(PARAMS), _stats_step(tx), []
  for start in range(0, N, B0):
    batch = {"x": _X[start:start + B0], "y": _Y[start:start + B0]}
    records.append(dbj.gradient_stats(_loss, params, batch)[2])
    params, state = step(params, state, batch["x"], batch["y"], False)
  expected = float(dbj.diversity(dbj.combine_stats(*records)))
  summary = dbj.batch_state_summary(state)
  assert summary["statistic"] == pytest.approx(expected, rel=1e-5)
  assert summary["batch_size"] == min(N, max(B0, int(np.floor(N * expected))))


def test_bfloat16_params_keep_their_dtype():
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
  tx = _tx("divebatch", "adam")
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))


# ------------------------------------------------------------------ apply_if_finite


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_apply_if_finite_inside_skips_a_nan_step_and_keeps_the_epochs(inner):
  tx = _tx("divebatch", optax.apply_if_finite(INNERS[inner](), max_consecutive_errors=3))
  params, state, examples = _run(tx, 3, nan_step=2)
  s = dbj.find_state(state)
  assert (int(s.epoch), int(s.epoch_position), int(s.examples_seen)) == (3, 0, examples) == (3, 0, 3 * N)
  assert int(optax.tree.get(state, "total_notfinite")) == 1
  assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
  assert np.isfinite(float(s.statistic)) and int(s.batch_size) > B0  # the NaN record did not poison Δ̂


def test_apply_if_finite_around_names_the_fix_once_a_step_is_skipped():
  tx = optax.apply_if_finite(_tx("divebatch", "sgd"), max_consecutive_errors=3)
  _run(tx, 2)  # no NaN: fine
  with pytest.raises(ValueError, match=r"put it inside instead, adaptive_batch\(optax.apply_if_finite"):
    _run(tx, 2, nan_step=1)


# ------------------------------------------------------------------ MultiSteps


def test_multisteps_inside_counts_every_micro_step_and_accumulates_statistics():
  k = 2
  tx = _tx("divebatch", optax.MultiSteps(optax.sgd(0.05), every_k_schedule=k))
  params, state, step, records = PARAMS, tx.init(PARAMS), _stats_step(tx), []
  for start in range(0, N, B0):
    batch = {"x": _X[start:start + B0], "y": _Y[start:start + B0]}
    records.append(dbj.gradient_stats(_loss, params, batch)[2])
    params, state = step(params, state, batch["x"], batch["y"], False)
  summary = dbj.batch_state_summary(state)
  assert (summary["epoch"], summary["examples_seen"]) == (1, N)
  assert summary["statistic"] == pytest.approx(float(dbj.diversity(dbj.combine_stats(*records))), rel=1e-5)
  assert int(optax.tree.get(state, "gradient_step")) == N // B0 // k


def test_multisteps_around_gives_one_clear_error():
  tx = optax.MultiSteps(_tx("divebatch", "sgd"), every_k_schedule=2)
  with pytest.raises(ValueError, match=r"adaptive_batch inside optax.MultiSteps.*Put MultiSteps inside"):
    dbj.current_batch_size(tx.init(PARAMS), epoch=0)


# ------------------------------------------------------------------ partition


def test_stats_into_one_partition_group_gives_one_clear_error():
  labels = {"w": "adaptive", "b": "plain"}
  tx = optax.transforms.partition({"adaptive": _tx("divebatch", "sgd"), "plain": optax.sgd(0.1)}, labels)
  _, grad, stats = dbj.gradient_stats(_loss, PARAMS, {"x": _X[:B0], "y": _Y[:B0]})
  with pytest.raises(ValueError, match=r"inside optax.transforms.partition.*Wrap the whole optimizer"):
    tx.update(grad, tx.init(PARAMS), PARAMS, stats=stats)


def test_partition_inside_adaptive_batch_works():
  labels = {"w": "fast", "b": "slow"}
  inner = optax.transforms.partition({"fast": optax.sgd(0.1), "slow": optax.adam(0.01)}, labels)
  params, state, examples = _run(_tx("divebatch", inner), 2)
  s = dbj.find_state(state)
  assert (int(s.epoch), int(s.examples_seen)) == (2, examples) and int(s.batch_size) > B0


# ------------------------------------------------------------------ nnx.Optimizer


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_nnx_optimizer_update_with_stats_under_nnx_jit(inner):
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _tx("divebatch", inner), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss_fn = lambda m, batch: 0.5 * (m(batch["x"])[:, 0] - batch["y"]) ** 2
    _, grads, stats = dbj.nnx.value_and_grad(loss_fn)(model, {"x": x, "y": y})
    optimizer.update(model, grads, stats=stats)

  for epoch in range(2):
    b = dbj.current_batch_size(optimizer.opt_state, epoch=epoch)
    for start in range(0, N, b):
      train_step(model, optimizer, _X[start:start + b], _Y[start:start + b])
  s = dbj.find_state(optimizer.opt_state)
  assert (int(s.epoch), int(s.examples_seen)) == (2, 2 * N) and int(s.batch_size) > B0
  if inner == "adam":
    assert int(optax.tree.get(optimizer.opt_state, "count")) == int(s.steps)


# ------------------------------------------------------------------ no silent no-op


@pytest.fixture
def fresh_warnings(monkeypatch):
  monkeypatch.setattr(readers, "_warned", set())


@pytest.mark.parametrize("policy", ["divebatch", "norm_test", "noise_scale"])
def test_a_statistics_policy_without_statistics_warns_once(policy, fresh_warnings):
  tx = _tx(policy, "sgd")
  params, state = PARAMS, tx.init(PARAMS)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p))
  grad = jax.tree.map(jnp.ones_like, PARAMS)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for epoch in range(3):
      b = dbj.current_batch_size(state, epoch=epoch)
      for _ in range(0, N, b):
        _, state = update(grad, state, params)
    dbj.batch_state_summary(state)
  messages = [str(w.message) for w in caught]
  assert len(messages) == 1 and "pass stats=" in messages[0] and "optimizer.update" in messages[0].lower()
  assert int(dbj.find_state(state).decisions) == 0


@pytest.mark.parametrize("policy", ["divebatch", "constant", "adabatch"])
def test_no_warning_when_statistics_arrive_or_are_not_read(policy, fresh_warnings):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    _run(_tx(policy, "sgd"), 2)
  assert not [w for w in caught if "stats=" in str(w.message)]


def test_divebatch_reads_only_its_window():
  """resize_every=2: epoch 0 without statistics is outside the window, no warning."""
  tx = dbj.adaptive_batch(optax.sgd(0.05), policies.divebatch(1.0, N, resize_every=2),
                          num_examples=N, base_batch_size=B0)
  state = tx.init(PARAMS)
  for _ in range(N // B0):
    _, state = tx.update(jax.tree.map(jnp.ones_like, PARAMS), state, PARAMS)
  assert int(dbj.find_state(state).unmeasured_windows) == 0


# ------------------------------------------------------------------ drop_remainder


def test_drop_remainder_counts_the_epochs_a_dropping_loader_serves():
  b, n = 5, N  # 16 examples in batches of 5: three per epoch, one example dropped
  tx = dbj.adaptive_batch(optax.sgd(0.05), policies.constant(), num_examples=n, base_batch_size=b,
                          drop_remainder=True)
  state = tx.init(PARAMS)
  for epoch in range(3):
    assert dbj.current_batch_size(state, epoch=epoch) == b
    for start in range(0, n - b + 1, b):
      _, state = tx.update(jax.tree.map(jnp.ones_like, PARAMS), state, PARAMS)
  s = dbj.find_state(state)
  assert (int(s.epoch), int(s.examples_seen), int(s.steps)) == (3, 3 * 15, 9)
