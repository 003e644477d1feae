"""Critical batch size: the measurement's rule, the cbs-warmup schedule, the CLI on a char GPT."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_records
from divebatch_jax import policies
from divebatch_jax.data import sources
from divebatch_jax.train import cbs, main
from divebatch_jax.transform.policies import base
from divebatch_jax.transform.policies.cbs_warmup import fit_cbs


def _simulate(policy, counts, b0, n=10_000):
  """The batch size after each step of ``counts`` examples (the policy's update, step by step)."""
  state, b, sizes = policy.init(None), b0, []
  for step, count in enumerate(counts):
    info = base.PolicyInfo({}, False, jnp.int32(count), jnp.int32(step), jnp.int32(0), jnp.bool_(False),
                           jnp.int32(b), jnp.int32(n), jnp.int32(b0))
    decision, state = policy.update(info, state)
    b = int(decision.batch_size)
    sizes.append((b, float(decision.lr_multiplier)))
  return sizes


def _by_hand(examples, xs, ys, b0, b_max):
  """b(x) = min(b0·2^k, b_max), k = max(floor(log2(cbs(x)/b0)), 0), cbs linear between points."""
  value = float(np.interp(examples, xs, ys))
  k = 0
  while b0 * 2 ** (k + 1) <= value:
    k += 1
  return min(b0 * 2**k, b_max)


def test_cbs_warmup_follows_the_hand_computed_doubling_schedule():
  xs, ys, b0, b_max = [0, 400, 1000, 3000], [4, 20, 70, 300], 8, 128
  policy = policies.cbs_warmup((xs, ys), max_batch_size=b_max)
  sizes, seen, expected, b = [], 0, [], b0
  counts = []
  for _ in range(120):  # each step uses the batch in force
    counts.append(b)
    seen += b
    b = max(b, _by_hand(seen, xs, ys, b0, b_max))
    expected.append(b)
  sizes = [s for s, _ in _simulate(policy, counts, b0)]
  assert sizes == expected
  assert sizes[-1] == b_max and sorted(set(sizes)) == [8, 16, 32, 64, 128]


def test_cbs_warmup_lr_power_and_every():
  policy = policies.cbs_warmup(([0, 100], [8, 32]), max_batch_size=64, lr_power=0.5, every=3)
  out = _simulate(policy, [50] * 6, 8)
  # decisions after steps 3 and 6 only (every=3): at 150 and 300 examples cbs = 32
  assert [b for b, _ in out] == [8, 8, 32, 32, 32, 32]
  assert out[2][1] == pytest.approx(2.0)  # (32/8)^0.5


def test_seesaw_over_examples_doubles_at_each_halving_of_the_cosine():
  epochs, n, b0 = 2, 1000, 8
  policy = policies.seesaw_over_examples(epochs, b0, max_batch_size=1024, lr_power=0.5)
  out = _simulate(policy, [10] * 199, b0, n=n)
  for step, (b, scale) in enumerate(out):
    done = (step + 1) * 10 / (epochs * n)
    d = 0.5 * (1 + math.cos(math.pi * done))
    k = math.floor(math.log2(1 / d) + 1e-6)
    assert b == min(b0 * 2**k, 1024), (step, b, k)
    assert scale == pytest.approx(math.sqrt(b / b0))


def test_fit_is_the_log_space_least_squares_power_law():
  x = np.array([100.0, 1000.0, 10000.0])
  a, p = fit_cbs(x, 3.0 * x**0.5)
  assert (a, p) == pytest.approx((3.0, 0.5))
  with pytest.raises(ValueError, match="two points"):
    fit_cbs([0, 100], [8, 16])


def test_fitted_curve_is_the_power_law_capped_at_the_largest_measurement():
  x = np.array([0.0, 100.0, 1000.0, 10000.0])
  y = np.array([4.0, 8.0, 8.0 * 10**0.5, 80.0])  # 8·(x/100)^0.5 beyond 0; the last point caps
  curve = policies.fitted_cbs(x, y)
  a, p = fit_cbs(x, y)
  for value in (50.0, 400.0, 5000.0, 1e6):
    assert float(curve(value)) == pytest.approx(min(a * value**p, 80.0), rel=1e-5)


@pytest.mark.parametrize(
    "losses,epsilon,expected",
    [
        ({8: 2.0, 16: 2.01, 32: 2.03, 64: 2.02}, 0.01, 16),   # 32 breaks it: 64 is not counted
        ({8: 2.0, 16: 2.0, 32: 2.0}, 0.0, 32),
        ({8: 2.0, 16: 2.5}, 0.1, 8),
    ],
)
def test_critical_batch_size_is_the_largest_contiguous_batch_within_tolerance(losses, epsilon, expected):
  brute = max(b for b in losses if all(losses[c] <= (1 + epsilon) * losses[min(losses)] + 1e-12 for c in losses if c <= b))
  assert cbs.critical_batch_size(losses, epsilon) == brute == expected


def test_cbs_needs_a_finished_run(tmp_path, capsys):
  assert main(["cbs", "--out", str(tmp_path)]) == 2
  assert "no config.json" in capsys.readouterr().err


needs_shakespeare = pytest.mark.skipif(
    not (sources.default_data_dir() / "text" / "tinyshakespeare.txt").is_file(), reason="no tinyshakespeare")
LM = [
    "--dataset", "tinyshakespeare", "--model", "gpt", "--optimizer", "adamw", "--lr", "3e-3",
    "--weight-decay", "0.1", "--warmup-steps", "10", "--clip-norm", "1", "--schedule", "cosine-examples",
    "--context", "32", "--num-test-examples", "128", "--batch-size", "8", "--max-batch-size", "64",
    "--device-batch", "16", "--resize-every-steps", "15", "--test-every", "5", "--num-examples", "400",
]


@needs_shakespeare
@pytest.mark.slow
def test_cbs_on_a_tiny_char_gpt_writes_the_table_and_feeds_cbs_warmup(tmp_path):
  run = tmp_path / "sgd"
  assert main(LM + ["--method", "sgd", "--epochs", "3", "--checkpoint-every", "1", "--out", str(run)]) == 0
  assert main(["cbs", "--out", str(run), "--multiples", "1,2,4", "--budget-examples", "128"]) == 0
  result = json.loads((run / "cbs.json").read_text())
  # initialisation, epochs 1 and 2 (epoch 3 ends the cosine: rate 0, skipped)
  assert [p["epoch"] for p in result["points"]] == [0, 1, 2]
  for point in result["points"]:
    losses = {int(b): v for b, v in point["losses"].items()}
    assert sorted(losses) == [8, 16, 32] and all(math.isfinite(v) for v in losses.values())
    assert point["cbs"] == cbs.critical_batch_size(losses, result["epsilon"])
    assert point["tokens"] == point["examples"] * 32
  table = (run / "cbs.md").read_text()
  assert "| epoch | tokens | loss b=8 | loss b=16 | loss b=32 | CBS |" in table
  assert (run / "cbs.png").read_bytes()[:4] == b"\x89PNG"
  out = tmp_path / "warm"
  assert main(LM + ["--method", "cbs-warmup", "--cbs-file", str(run / "cbs.json"), "--epochs", "2", "--out", str(out)]) == 0
  records = run_records(out)
  assert len(records) == 2 and all(math.isfinite(r["test_loss"]) for r in records)
  examples, values = cbs.read_curve(run)
  assert (examples, values) == ([p["examples"] for p in result["points"]], [p["cbs"] for p in result["points"]])
  assert records[0]["batch_size"] == 8
  assert 8 <= records[-1]["next_batch_size"] <= _by_hand(records[-1]["total_examples"], examples, values, 8, 64)
