"""The lr-batch coupling, the linear ramp and Seesaw, through adaptive_batch, against closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import divebatch_jax as dbj
from divebatch_jax import policies
from divebatch_jax.transform import coupling
from divebatch_jax.transform.schedule_decay import schedule_decay

ETA0 = 0.1


def _run(tx, steps):
  """(batch size in force, update of a unit gradient) at each step, plain steps (count = b)."""
  params = jnp.zeros(())
  state = tx.init(params)
  update = jax.jit(lambda g, s: tx.update(g, s, params))
  sizes, steps_taken = [], []
  for _ in range(steps):
    sizes.append(int(dbj.find_state(state).batch_size))
    u, state = update(jnp.ones(()), state)
    steps_taken.append(-float(u))
  return sizes, np.asarray(steps_taken)


def test_linear_ramp_matches_megatrons_formula():
  b0, b_max, n_ramp, inc = 16, 100, 1000, 24  # k = ceil(84/24) = 4 increments, one per 250 examples
  tx = dbj.adaptive_batch(optax.sgd(ETA0), policies.linear_ramp(b_max, ramp_examples=n_ramp, increment=inc),
                          num_examples=10**6, base_batch_size=b0)
  sizes, _ = _run(tx, 40)
  expected, seen = [], 0
  for _ in range(40):  # brute force: the size after each step from the examples seen so far
    expected.append(min(b0 + inc * (seen // (n_ramp // 4)), b_max) if seen else b0)
    seen += expected[-1]
  assert sizes == expected
  assert sizes[-1] == b_max and sorted(set(sizes)) == [16, 40, 64, 88, 100]


def test_linear_ramp_in_epochs_and_its_arguments():
  ramp = policies.linear_ramp(64, ramp_epochs=0.5)  # increment b0 = 16: 3 increments over n/2 = 48
  tx = dbj.adaptive_batch(optax.sgd(ETA0), ramp, num_examples=96, base_batch_size=16)
  sizes, _ = _run(tx, 6)
  expected, seen, position = [16], 0, 0
  for b in range(5):  # brute force, with the epoch's last step taking the rest of the 96 examples
    count = min(expected[-1], 96 - position)
    seen, position = seen + count, (position + count) % 96
    expected.append(min(16 + 16 * (seen // 16), 64))
  assert sizes == expected and sizes[:3] == [16, 32, 64]
  with pytest.raises(ValueError, match="exactly one of ramp_examples= or ramp_epochs="):
    policies.linear_ramp(64)
  with pytest.raises(ValueError, match="increment must be an integer >= 1"):
    policies.linear_ramp(64, ramp_examples=10, increment=0)


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_seesaw_with_a_halving_schedule_is_the_papers_rule(power):
  """Step schedule halving every 5 steps: batch ×2 per halving; lr η0 (SGD) or η0·2^(−k/2) (Adam)."""
  schedule = optax.exponential_decay(ETA0, 5, 0.5, staircase=True)
  decay = schedule_decay(schedule)
  tx = dbj.adaptive_batch(
      optax.sgd(schedule), policies.seesaw(decay, max_batch_size=64), num_examples=10**6, base_batch_size=8,
      lr_batch_coupling=coupling.replace_lr_decay(decay, power=power))
  sizes, lrs = _run(tx, 30)
  k = np.arange(30) // 5
  np.testing.assert_array_equal(sizes, np.minimum(8 * 2**k, 64))
  s = np.minimum(2.0**k, 8.0)  # capped at b_max / b0 = 8 from the 3rd halving on
  expected = ETA0 * np.minimum(0.5**k * s**power, 1.0)
  np.testing.assert_allclose(lrs, expected, rtol=1e-5)
  if power == 1.0:
    np.testing.assert_allclose(lrs[:20], ETA0, rtol=1e-6)  # "for SGD the lr stays" until b_max


def test_coupling_on_a_growing_rule_anneals_once():
  """AdaBatch ×2 every epoch under a cosine over steps: η(t)·min(S, 1/d(t))."""
  n, b0, steps = 64, 8, 40
  schedule = optax.cosine_decay_schedule(ETA0, 60)
  decay = schedule_decay(schedule)
  tx = dbj.adaptive_batch(
      optax.sgd(schedule), policies.adabatch(2, 1, max_batch_size=64), num_examples=n, base_batch_size=b0,
      lr_batch_coupling=coupling.replace_lr_decay(decay))
  sizes, lrs = _run(tx, steps)
  t = np.arange(steps)
  d = 0.5 * (1 + np.cos(np.pi * t / 60))
  s = np.asarray(sizes) / b0
  np.testing.assert_allclose(lrs, ETA0 * d * np.minimum(s, 1 / d), rtol=1e-5)
  assert max(sizes) == 64 and np.all(lrs <= ETA0 * (1 + 1e-6))


def test_coupling_factor_closed_form_and_checks():
  decay = schedule_decay(lambda e: 0.2 * 0.5**e, per="epoch")
  replace = coupling.replace_lr_decay(decay, power=0.5)
  for ratio, epoch in [(1.0, 0), (4.0, 1), (4.0, 3), (16.0, 2)]:
    factor = float(replace.factor(jnp.float32(ratio), step=jnp.int32(99), epoch=jnp.int32(epoch)))
    assert factor == pytest.approx(min(math.sqrt(ratio), 2.0**epoch), rel=1e-6)
  with pytest.raises(ValueError, match="use lr_rule='none'"):
    dbj.adaptive_batch(optax.sgd(0.1), policies.constant(), num_examples=8, base_batch_size=2,
                       lr_rule="linear", lr_batch_coupling=replace)
  with pytest.raises(TypeError, match="lr_batch_coupling must be None or"):
    dbj.adaptive_batch(optax.sgd(0.1), policies.constant(), num_examples=8, base_batch_size=2,
                       lr_batch_coupling="replace")
  with pytest.raises(ValueError, match="per must be one of"):
    schedule_decay(lambda t: 0.1, per="token")
  with pytest.raises(TypeError, match="decay must be a ScheduleDecay"):
    policies.seesaw(lambda t: 0.1, max_batch_size=8)
