"""The loop's pure pieces: the epoch record from its inputs."""

import math

import jax.numpy as jnp
import pytest

from divebatch_jax.train.loop import EpochTotals, epoch_record


def _summary(**overrides):
  summary = {"batch_size": 32, "learning_rate": 0.1, "decisions": 0, "statistic": float("nan"),
             "requested": float("nan"), "step": 10, "examples_seen": 300}
  return summary | overrides


def _record(**overrides):
  arguments = dict(
      epoch=2, method="divebatch", lr=0.05, instrumented=True,
      start=_summary(), end=_summary(batch_size=64, decisions=1, statistic=0.25, requested=70.0,
                                     step=20, examples_seen=600),
      totals=EpochTotals(jnp.float32(150.0), 10, 320, 2.0), n=300, evaluation=(0.8, 0.6, 0.5),
      compiles=(3, 0.25, 1.5), layout={"device_batch": 32, "devices": 1, "processes": 1},
  )
  return epoch_record(**(arguments | overrides))


def test_record_fields_follow_from_the_inputs():
  r = _record()
  assert r["epoch"] == 3 and r["batch_size"] == 32 and r["next_batch_size"] == 64
  assert r["lr"] == 0.1  # the state's effective rate, not the schedule's
  assert r["diversity"] == r["statistic"] == 0.25 and r["requested_batch_size"] == 70.0
  assert r["train_loss"] == pytest.approx(150.0 / 300)
  assert (r["test_accuracy"], r["test_loss"], r["eval_time_s"]) == (0.8, 0.6, 0.5)
  assert r["train_time_s"] == pytest.approx(2.0 + 1.5)  # the steps and the compiles before them
  assert r["compile_s"] == pytest.approx(1.5 + 0.25) and r["compile_stall_s"] == 0.25
  assert r["train_time_s"] - r["compile_s"] == pytest.approx(2.0 - 0.25)
  assert (r["steps"], r["examples"], r["compilations"]) == (10, 300, 3)
  assert (r["total_steps"], r["total_examples"]) == (20, 600)
  assert r["padding_fraction"] == pytest.approx(1 - 300 / 320)


def test_no_statistic_where_the_epoch_did_not_measure_or_decide():
  assert _record(instrumented=False)["statistic"] is None
  undecided = _summary(decisions=0, statistic=0.25, requested=70.0)
  r = _record(end=undecided)
  assert r["statistic"] is None and r["requested_batch_size"] is None


def test_diversity_only_for_divebatch_and_nan_as_none():
  assert _record(method="norm-test")["diversity"] is None
  assert _record(method="norm-test")["statistic"] == 0.25
  r = _record(end=_summary(decisions=1, statistic=math.inf, requested=math.nan))
  assert r["statistic"] is None and r["requested_batch_size"] is None


def test_lr_falls_back_to_the_schedule_without_an_injected_rate():
  assert _record(start=_summary(learning_rate=None))["lr"] == 0.05
