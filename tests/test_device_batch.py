"""The device-batch measurement: what is read back is validated, what is kept was measured twice alike."""

import json
import math

import pytest
from conftest import run_records

from divebatch_jax.train import device_batch, loop
from divebatch_jax.train.config import TrainConfig
from divebatch_jax.train.device_batch import Measurer, problem_with

SIZES = [8, 16, 32, 64]
GOOD = {8: 10_000.0, 16: 19_000.0, 32: 30_000.0, 64: 31_000.0}  # m = 32 (within 5% of the best)


@pytest.mark.parametrize("rates, needle", [
    ({}, "non-empty"),
    ({100_000: 5.0}, "first of the candidate sizes"),
    ({0: 5.0}, "first of the candidate sizes"),
    ({8: 1.0, 32: 2.0}, "first of the candidate sizes"),      # skips 16
    ({16: 1.0, 8: 2.0}, "first of the candidate sizes"),      # out of order
    ({8: float("nan")}, "finite"),
    ({8: -3.0}, "finite"),
    ({8: math.inf}, "finite"),
    # the entry measured under load: 256 rows took less time than 128
    ({8: 5609.0, 16: 17817.0, 32: 50842.0, 64: 27966.0, 128: 75498.0}, "took less time"),
    ([1, 2], "non-empty object"),
])
def test_implausible_measurements_are_named(rates, needle):
  sizes = SIZES + [128]
  assert needle in problem_with(rates, sizes)


def test_a_plausible_measurement_passes():
  assert problem_with(GOOD, SIZES) is None
  assert problem_with({8: 10_000.0, 16: 9_000.0}, SIZES) is None  # slower, stopped early: fine


def test_a_measurement_is_kept_only_when_two_agree(tmp_path):
  noisy = iter([{8: 1.0, 16: 50.0}, GOOD, {k: v * 1.1 for k, v in GOOD.items()}])
  measurer = Measurer(tmp_path, time_rates=lambda run_at, sizes: next(noisy))
  rates = measurer.rates("k", None, SIZES, echo=lambda line: None)
  assert device_batch.fastest(rates) == 32
  assert json.loads((tmp_path / "device_batch.json").read_text())["k"] == {str(k): v * 1.1 for k, v in GOOD.items()}


def test_disagreeing_measurements_serve_the_run_and_are_not_kept(tmp_path):
  alternating = iter([GOOD, {8: 10_000.0, 16: 40_000.0}] * 2)
  lines = []
  measurer = Measurer(tmp_path, time_rates=lambda run_at, sizes: next(alternating))
  rates = measurer.rates("k", None, SIZES, echo=lines.append)
  assert problem_with(rates, SIZES) is None
  assert not (tmp_path / "device_batch.json").exists()
  assert "disagreed" in lines[0] and "--device-batch" in lines[0]


def test_the_cache_can_be_turned_off(monkeypatch):
  monkeypatch.setenv("DIVEBATCH_CACHE_DIR", "off")
  assert Measurer.from_environment().cache_dir is None
  calls = []
  measurer = Measurer(None, time_rates=lambda run_at, sizes: calls.append(1) or GOOD)
  assert measurer.rates("k", None, SIZES, echo=lambda line: None) == GOOD
  assert measurer.rates("k", None, SIZES, echo=lambda line: None) == GOOD
  assert len(calls) == 4  # two agreeing measurements per run, nothing kept


SMALL = TrainConfig(
    dataset="synthetic", num_examples=300, num_test_examples=100, model="logreg", epochs=1,
    batch_size=8, max_batch_size=64, method="sgd", progress=False,
)


def _device_batch(out):
  return [r["device_batch"] for r in run_records(out)]


@pytest.mark.parametrize("poison", [
    {"100000": 5.0}, {"0": 1.0}, {}, {"8": float("nan")}, {"8": "fast"}, "nonsense", None,
    {"8": 5609.0, "16": 17817.0, "32": 50842.0, "64": 1e9},
])
@pytest.mark.slow
def test_a_poisoned_cache_never_sets_m_beyond_its_limits_and_is_repaired(tmp_path, poison):
  measurer = Measurer(tmp_path / "cache", time_rates=lambda run_at, sizes: {s: 1000.0 * s for s in sizes[:2]})
  loop.train_and_evaluate(SMALL.replace(out=str(tmp_path / "a")), echo=lambda line: None, measurer=measurer)
  stored = tmp_path / "cache" / "device_batch.json"
  (key,) = json.loads(stored.read_text())
  stored.write_text(json.dumps({key: poison}))  # valid JSON, nonsense values
  lines = []
  loop.train_and_evaluate(SMALL.replace(out=str(tmp_path / "b")), echo=lines.append, measurer=measurer)
  assert _device_batch(tmp_path / "a") == _device_batch(tmp_path / "b") == [16]
  assert any("invalid" in line for line in lines)
  assert problem_with(measurer.read(key, json.loads(key)[-1])[0], json.loads(key)[-1]) is None  # rewritten
