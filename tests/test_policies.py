"""Each policy against its formula, on hand-made statistics records."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import divebatch_jax as dbj
from divebatch_jax import policies
from divebatch_jax.stats import GradientStats


def record(count, sum_g, sum_sq, sum_ip=0.0):
  return GradientStats(jnp.int32(count), jnp.asarray(sum_g, jnp.float32), jnp.float32(sum_sq), jnp.float32(sum_ip))


def info(stats=None, *, batch_size=128, epoch=0, epoch_end=True, step=0, n=1000, b0=128):
  has = stats is not None
  return policies.PolicyInfo(
      stats=stats if has else dbj.empty_stats(jnp.zeros(2)),
      has_stats=has,
      count=jnp.int32(stats.count if has else batch_size),
      step=jnp.int32(step),
      epoch=jnp.int32(epoch),
      epoch_end=jnp.asarray(epoch_end),
      batch_size=jnp.int32(batch_size),
      num_examples=jnp.int32(n),
      base_batch_size=jnp.int32(b0),
  )


def decide(policy, stats=None, state=None, **kw):
  state = policy.init(jnp.zeros(2)) if state is None else state
  decision, state = policy.update(info(stats, **kw), state)
  return int(decision.batch_size), float(decision.statistic), state


# ----------------------------------------------------------------------------- DiveBatch


def test_divebatch_truncates_delta_n_diversity():
  # Δ̂ = sum_sq / ||sum_g||² = 2.018 / 1 ; δ·n·Δ̂ = 0.1·1000·2.018 = 201.8 -> 201.
  policy = policies.divebatch(0.1, 2048, resize_every=1)
  b, stat, _ = decide(policy, record(1000, [1.0, 0.0], 2.018))
  assert b == math.floor(0.1 * 1000 * np.float32(2.018))
  assert b == 201
  np.testing.assert_allclose(stat, 2.018, rtol=1e-6)


def test_divebatch_clamps_and_never_decreases():
  policy = policies.divebatch(0.1, 2048, resize_every=1)
  assert decide(policy, record(1000, [1.0, 0.0], 0.5))[0] == 128  # 50 < b: keep b
  assert decide(policy, record(1000, [1.0, 0.0], 500.0))[0] == 2048  # 50,000 > b_max
  down = policies.divebatch(0.1, 2048, resize_every=1, allow_decrease=True, min_batch_size=16)
  assert decide(down, record(1000, [1.0, 0.0], 0.5))[0] == 50
  assert decide(down, record(1000, [1.0, 0.0], 0.01))[0] == 16


def test_divebatch_inf_goes_to_max_and_nan_keeps_the_batch():
  policy = policies.divebatch(0.1, 2048, resize_every=1)
  # Σg = 0 with finite gradients: Δ̂ = +inf -> b_max (the authors' rule).
  assert decide(policy, record(1000, [0.0, 0.0], 3.0))[0] == 2048
  # Non-finite gradients (a diverging run): Δ̂ is NaN, told apart from +inf; b stays.
  b, stat, _ = decide(policy, record(1000, [float("nan"), 1.0], float("nan")))
  assert b == 128 and math.isnan(stat)
  assert math.isnan(float(dbj.diversity(record(10, [float("inf"), 0.0], 1.0))))
  assert float(dbj.diversity(record(10, [0.0, 0.0], 1.0))) == math.inf


def test_divebatch_ignores_statistics_outside_its_window():
  """Passing stats= on every step equals passing them in instrumented epochs only."""
  policy = policies.divebatch(0.1, 2048, resize_every=2)
  every, window = policy.init(jnp.zeros(2)), policy.init(jnp.zeros(2))
  rng = np.random.default_rng(0)
  trajectory = {"every": [], "window": []}
  for epoch in range(6):
    for step in range(3):
      rec = record(40, rng.normal(size=2), float(rng.uniform(1, 9)))
      end = step == 2
      b1, _, every = decide(policy, rec, every, epoch=epoch, epoch_end=end)
      b2, _, window = decide(policy, rec if policy.needs_stats(epoch) else None, window, epoch=epoch, epoch_end=end)
      trajectory["every"].append(b1)
      trajectory["window"].append(b2)
  assert trajectory["every"] == trajectory["window"]
  assert len(set(trajectory["every"])) > 1  # the rule did resize


def test_divebatch_accumulates_the_instrumented_epoch_and_resizes_only_at_its_end():
  policy = policies.divebatch(0.1, 2048, resize_every=3)
  assert [e for e in range(9) if policy.needs_stats(e)] == [2, 5, 8]
  state = policy.init(jnp.zeros(2))
  # Two batches of the instrumented epoch 2: sums add; decision at the epoch's end only.
  b, stat, state = decide(policy, record(10, [1.0, 1.0], 4.0), state, epoch=2, epoch_end=False)
  assert b == 128 and math.isnan(stat)
  b, stat, state = decide(policy, record(30, [1.0, 1.0], 4.0), state, epoch=2, epoch_end=True)
  # Δ̂ = (4+4)/||(2,2)||² = 1 ; δ·n·Δ̂ = 100 < 128 -> keep 128, accumulators reset.
  np.testing.assert_allclose(stat, 1.0)
  assert b == 128 and int(state.epoch_stats.examples) == 0
  # A non-resize epoch end does nothing even with stats.
  b, stat, _ = decide(policy, record(30, [1.0, 0.0], 400.0), None, epoch=0, epoch_end=True)
  assert b == 128 and math.isnan(stat)


def test_divebatch_ema_estimator_uses_one_plus_noise_scale():
  policy = policies.divebatch(0.5, 4096, resize_every=1, estimator="ema", ema_decay=0.0)
  stats = record(100, [10.0, 0.0], 40.0)
  b, stat, _ = decide(policy, stats, n=1000)
  trace, grad_sq = (float(x) for x in dbj.noise_components(stats))
  target = 0.5 * (1 + trace / grad_sq)
  assert b == max(128, math.floor(target))
  np.testing.assert_allclose(stat * 1000, 1 + trace / grad_sq, rtol=1e-5)


# ----------------------------------------------------------------------------- schedules


def _trajectory(tx, epochs, n):
  """Batch size in force during each epoch, driving the transformation without stats."""
  state = tx.init(jnp.zeros(2))
  grad = jnp.zeros(2)
  update = jax.jit(tx.update)
  sizes = []
  for _ in range(epochs):
    b = dbj.current_batch_size(state)
    sizes.append(b)
    for _ in range(-(-n // b)):
      _, state = update(grad, state)
  return sizes, state


def test_adabatch_trajectory_over_200_epochs():
  n = 4096
  tx = dbj.adaptive_batch(
      optax.sgd(0.1), policies.adabatch(2, 20, max_batch_size=2048, lr_factor=0.75),
      num_examples=n, base_batch_size=128, lr_rule="none",
  )
  sizes, state = _trajectory(tx, 200, n)
  assert sizes == [min(128 * 2 ** (e // 20), 2048) for e in range(200)]
  # lr ×0.75 at each of the four increases (128 -> 2048), then no more.
  np.testing.assert_allclose(float(dbj.find_state(state).lr_scale), 0.75**4, rtol=1e-6)


def test_sebs_trajectory_over_200_epochs_with_uneven_stages():
  n = 4096
  tx = dbj.adaptive_batch(
      optax.sgd(0.1), policies.sebs(2, [30, 50], 1024), num_examples=n, base_batch_size=64, lr_rule="none"
  )
  sizes, state = _trajectory(tx, 200, n)
  boundaries = [30, 80, 130, 180]
  expected = [min(64 * 2 ** sum(e >= s for s in boundaries), 1024) for e in range(200)]
  assert sizes == expected
  assert float(dbj.find_state(state).lr_scale) == 1.0
  assert not policies.sebs(2, 5, 1024).needs_stats(3)


def test_constant_policy_keeps_b0():
  assert decide(policies.constant(), record(50, [1.0, 0.0], 9.0))[0] == 128


# ----------------------------------------------------------------------------- tests


def _norm_request(stats, eta):
  b = int(stats.count)
  gbar = np.asarray(stats.sum_g, np.float64) / b
  var = (float(stats.sum_sq) - b * gbar @ gbar) / (b - 1)
  return math.ceil(var / (eta**2 * gbar @ gbar))


def test_norm_test_against_formula():
  stats = record(128, [12.8, 6.4], 600.0)
  request = _norm_request(stats, 0.5)
  b, stat, _ = decide(policies.norm_test(0.5, 10_000), stats)
  assert stat == request and b == max(128, request)
  assert decide(policies.norm_test(0.5, 200), stats)[0] == min(max(128, request), 200)
  # A passing test (tiny variance) keeps b.
  passing = record(128, [128.0, 0.0], 128.0 + 1e-3)
  assert decide(policies.norm_test(0.5, 10_000), passing)[0] == 128


def test_norm_test_only_every_k_steps_and_nan_keeps_b():
  stats = record(128, [12.8, 6.4], 600.0)
  policy = policies.norm_test(0.5, 10_000, every=4)
  # decides on every 4th step (0-based steps 3, 7, ...): ⌊s/4⌋ decisions in s steps
  assert decide(policy, stats, step=2)[0] == 128
  assert decide(policy, stats, step=3)[0] > 128
  assert decide(policy, stats, step=4)[0] == 128
  assert decide(policy, record(1, [1.0, 0.0], 1.0), step=3)[0] == 128  # one example: NaN variance


def test_inner_product_and_augmented_tests_against_formula():
  b = 100
  rng = np.random.default_rng(0)
  g = rng.normal(size=(b, 2)) + np.array([0.3, 0.1])
  gbar = g.mean(0)
  ip = g @ gbar
  stats = record(b, g.sum(0), (g**2).sum(), (ip**2).sum())
  var_ip = ((ip - gbar @ gbar) ** 2).sum() / (b - 1)
  var_o = ((g**2).sum(1) - ip**2 / (gbar @ gbar)).sum() / (b - 1)
  theta, nu = 0.5, 1.0
  req_ip = var_ip / (theta**2 * (gbar @ gbar) ** 2)
  req_o = var_o / (nu**2 * (gbar @ gbar))
  _, stat, _ = decide(policies.inner_product_test(theta, max_batch_size=10**6), stats, batch_size=b)
  np.testing.assert_allclose(stat, math.ceil(req_ip), rtol=1e-4)
  _, stat, _ = decide(policies.inner_product_test(theta, nu, max_batch_size=10**6), stats, batch_size=b)
  np.testing.assert_allclose(stat, math.ceil(max(req_ip, req_o)), rtol=1e-4)


def test_noise_scale_policy_smooths_components_then_divides():
  policy = policies.noise_scale(scale=2.0, ema=0.5, max_batch_size=10**6)
  records = [record(64, [32.0, 0.0], 80.0), record(64, [16.0, 16.0], 40.0)]
  state = policy.init(jnp.zeros(2))
  traces, sqs = [], []
  for r in records:
    b, stat, state = decide(policy, r, state, batch_size=2)
    t, s = (float(x) for x in dbj.noise_components(r))
    traces.append(t)
    sqs.append(s)
  # Bias-corrected EMA with β = 0.5 over two records: weights (0.25, 0.5)/0.75.
  tr = (0.25 * traces[0] + 0.5 * traces[1]) / 0.75
  sq = (0.25 * sqs[0] + 0.5 * sqs[1]) / 0.75
  np.testing.assert_allclose(stat, tr / sq, rtol=1e-5)
  assert b == math.floor(2.0 * (1 + tr / sq))


@pytest.mark.parametrize(
    "factory,kwargs,message",
    [
        (policies.divebatch, dict(delta=0.0, max_batch_size=8), "delta"),
        (policies.divebatch, dict(delta=0.1, max_batch_size=0), "max_batch_size"),
        (policies.divebatch, dict(delta=0.1, max_batch_size=8, estimator="x"), "estimator"),
        (policies.divebatch, dict(delta=0.1, max_batch_size=8, resize_every=2.5), "resize_every"),
        (policies.adabatch, dict(factor=0.5, max_batch_size=8), "factor"),
        (policies.sebs, dict(rho=2, stage_epochs=[], max_batch_size=8), "stage_epochs"),
        (policies.norm_test, dict(eta=-1, max_batch_size=8), "eta"),
        (policies.inner_product_test, dict(theta=0.5, nu=0, max_batch_size=8), "nu"),
        (policies.noise_scale, dict(ema=1.0, max_batch_size=8), "ema"),
    ],
)
def test_bad_policy_arguments_name_the_argument(factory, kwargs, message):
  with pytest.raises(ValueError, match=message):
    factory(**kwargs)


def test_suggest_delta():
  assert dbj.suggest_delta(512, 50_000, 2.0) == pytest.approx(512 / 100_000)


def test_by_epoch_replays_a_trajectory():
  policy = policies.by_epoch([16, 16, 48, 128])
  b, sizes = 16, []
  for epoch in range(6):
    for step in range(3):
      b, _, _ = decide(policy, None, batch_size=b, epoch=epoch, epoch_end=step == 2)
    sizes.append(b)
  assert sizes == [16, 48, 128, 128, 128, 128]  # set at the end of epoch e for epoch e + 1
  with pytest.raises(ValueError, match="sizes"):
    policies.by_epoch([])


def test_divebatch_first_resize_sets_delta_from_the_measured_diversity():
  """δ = first_resize / (n·Δ̂₀) at the first resize; later resizes use that δ."""
  policy = policies.divebatch(None, 2048, resize_every=1, first_resize=300)
  state = policy.init(jnp.zeros(2))
  b, stat, state = decide(policy, record(1000, [1.0, 1.0], 4.0), state, n=1000)  # Δ̂ = 2
  assert b == 300 and stat == pytest.approx(2.0)
  np.testing.assert_allclose(float(state.delta), 300 / (1000 * 2.0))
  b, stat, state = decide(policy, record(1000, [1.0, 1.0], 8.0), state, batch_size=300, n=1000)  # Δ̂ = 4
  assert b == 600  # δ kept: 0.15 · 1000 · 4
  for sum_sq in (2.88, 4.8422928, 10 / 3, 7.1):  # δ·n·Δ̂ in float32 may round just below 32
    policy = policies.divebatch(None, 2048, resize_every=1, first_resize=32)
    b, _, _ = decide(policy, record(300, [1.0, 1.0], sum_sq), policy.init(jnp.zeros(2)), batch_size=8, n=300)
    assert b == 32, sum_sq
  with pytest.raises(ValueError, match="exactly one of delta"):
    policies.divebatch(0.1, 2048, first_resize=300)
  with pytest.raises(ValueError, match="exactly one of delta"):
    policies.divebatch(None, 2048)
  with pytest.raises(ValueError, match="finite"):
    policies.divebatch(float("inf"), 2048)


def test_suggest_delta_refuses_an_infinite_diversity():
  with pytest.raises(ValueError, match="finite"):
    dbj.suggest_delta(512, 50_000, float("inf"))


def test_goodput_maximises_throughput_times_statistical_efficiency():
  """Against the formula: smoothed B_noise from the records, then argmax over the candidates."""
  throughput = {16: 500.0, 32: 800.0, 64: 1000.0}
  policy = policies.goodput(throughput, max_batch_size=256, ema=0.0)  # β = 0: the last record
  sizes, rates = [16, 32, 64, 128, 192, 256], [500.0, 800.0, 1000.0, 1000.0, 1000.0, 1000.0]
  chosen = []
  for sum_sq in (100.0, 1000.0, 3000.0, 1e6):  # noisier gradients: larger batches pay
    rec = record(64, [64.0, 32.0], sum_sq)
    trace, grad_sq = (float(x) for x in dbj.noise_components(rec))
    b_noise = max(trace / grad_sq, 0.0) if grad_sq > 0 else math.inf
    efficiency = [1.0 if math.isinf(b_noise) else (b_noise + 16) / (b_noise + s) for s in sizes]
    expected = sizes[int(np.argmax([r * e for r, e in zip(rates, efficiency)]))]
    b, stat, _ = decide(policy, rec, batch_size=16, b0=16, n=10_000)
    assert b == expected and stat == pytest.approx(b_noise, rel=1e-5), (sum_sq, b, expected)
    chosen.append(b)
  assert chosen == sorted(chosen) and len(set(chosen)) > 1
  with pytest.raises(ValueError, match="throughput"):
    policies.goodput({1024: 5.0}, max_batch_size=512)
