"""metrics.jsonl writing/resuming and summary.json against brute-force references."""

import json

import numpy as np
import pytest

from conftest import run_records
from divebatch_jax.train import metrics


def _record(epoch, accuracy=0.5, **overrides):
  record = {
      "epoch": epoch,
      "batch_size": 128 * epoch,
      "lr": 0.1,
      "diversity": None if epoch % 2 else 1.5 * epoch,
      "train_loss": 2.0 / epoch,
      "test_accuracy": accuracy,
      "train_time_s": 1.25 * epoch,
      "eval_time_s": 0.5,
      "steps": 400 // epoch,
      "examples": 50_000,
      "compilations": 3 if epoch == 1 else 0,
  }
  return record | overrides


def test_required_fields_cover_the_issue():
  assert set(metrics.REQUIRED_FIELDS) == {
      "epoch", "batch_size", "lr", "diversity", "train_loss", "test_accuracy",
      "train_time_s", "eval_time_s", "steps", "examples", "compilations",
  }
  assert [n for n, f in metrics.REQUIRED_FIELDS.items() if f.nullable] == ["diversity"]


def test_writer_flushes_one_line_per_epoch(tmp_path):
  path = tmp_path / "run" / metrics.METRICS_FILE
  with metrics.MetricsWriter(path) as log:
    for epoch in (1, 2, 3):
      assert log.write(_record(epoch, method="divebatch", accuracy=np.float32(0.25)))
      assert [r["epoch"] for r in run_records(path.parent)] == list(range(1, epoch + 1))  # before close
  got = run_records(path.parent)
  assert got[1] == _record(2, method="divebatch", accuracy=0.25)
  assert got[0]["diversity"] is None and got[1]["diversity"] == 3.0
  assert metrics.read_records(path) == got


def test_resume_appends_without_duplicating_epochs(tmp_path):
  path = tmp_path / metrics.METRICS_FILE
  with metrics.MetricsWriter(path) as log:
    for epoch in (1, 2, 3):
      log.write(_record(epoch))
  with metrics.MetricsWriter(path) as log:  # resumed from a checkpoint taken after epoch 1
    assert log.last_epoch == 3 and len(log.records) == 3
    assert not log.write(_record(2, train_time_s=99.0))  # re-run epochs are already there
    assert not log.write(_record(3, train_time_s=99.0))
    assert log.write(_record(4))
  got = run_records(path.parent)
  assert [r["epoch"] for r in got] == [1, 2, 3, 4]
  assert got[1]["train_time_s"] == 2.5


def test_torn_last_line_is_dropped(tmp_path):
  path = tmp_path / metrics.METRICS_FILE
  with metrics.MetricsWriter(path) as log:
    log.write(_record(1))
  full = path.read_text()
  with open(path, "a") as f:
    f.write(json.dumps(_record(2))[:40])  # killed in the middle of a write
  assert [r["epoch"] for r in metrics.read_records(path)] == [1]
  with metrics.MetricsWriter(path) as log:
    assert log.last_epoch == 1
    assert path.read_text() == full
    log.write(_record(2))
  assert [r["epoch"] for r in run_records(path.parent)] == [1, 2]


def test_corrupt_middle_line_is_an_error(tmp_path):
  path = tmp_path / metrics.METRICS_FILE
  path.write_text(json.dumps(_record(1)) + "\n{oops\n" + json.dumps(_record(2)) + "\n")
  with pytest.raises(ValueError, match="line 2 is not valid JSON"):
    metrics.read_records(path)
  with pytest.raises(FileNotFoundError, match="no metrics file"):
    metrics.read_records(tmp_path / "absent.jsonl")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(epoch=1.0), "'epoch' must be int"),
        (dict(steps=True), "'steps' must be int"),
        (dict(lr="0.1"), "'lr' must be float"),
        (dict(train_loss=None), "'train_loss' must be float, got None"),
        (dict(test_accuracy=93.1), r"fraction in \[0, 1\]"),
        (dict(examples=-1), "'examples' must be >= 0"),
    ],
)
def test_bad_records_are_rejected(tmp_path, overrides, match):
  with metrics.MetricsWriter(tmp_path / metrics.METRICS_FILE) as log:
    with pytest.raises(ValueError, match=match):
      log.write(_record(1) | overrides)
    bad = _record(1)
    del bad["compilations"]
    with pytest.raises(ValueError, match=r"missing required metrics \['compilations'\]"):
      log.write(bad)
    log.write(_record(1))
    with pytest.raises(ValueError, match="must be 2"):
      log.write(_record(3))


def _reference_summary(records):
  """Brute force in numpy float64: scan for the first epoch within 0.01 of the final one."""
  acc = np.array([r["test_accuracy"] for r in records])
  hits = np.flatnonzero(np.round(acc - acc[-1], 9) >= -0.01)
  i = int(hits[0])
  return {
      "epoch": records[i]["epoch"],
      "steps": int(np.sum([r["steps"] for r in records[: i + 1]])),
      "examples": int(np.sum([r["examples"] for r in records[: i + 1]])),
      "train_time_s": float(np.sum([r["train_time_s"] for r in records[: i + 1]])),
  }


@pytest.mark.parametrize("seed", range(20))
def test_summarize_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 30))
  accuracy = np.clip(np.cumsum(rng.normal(0.02, 0.03, n)) + 0.3, 0, 1).round(4)
  records = [
      _record(e + 1, accuracy=float(a), steps=int(rng.integers(1, 500)),
              train_time_s=float(rng.uniform(0.1, 20)), examples=int(rng.integers(1, 1000)))
      for e, a in enumerate(accuracy)
  ]
  got = metrics.summarize(records)
  want = _reference_summary(records)
  assert got["final_accuracy"] == accuracy[-1] and got["best_accuracy"] == accuracy.max()
  assert got["first_within_epoch"] == want["epoch"]
  assert got["first_within_steps"] == want["steps"]
  assert got["first_within_examples"] == want["examples"]
  assert got["first_within_train_time_s"] == pytest.approx(want["train_time_s"], rel=1e-12)
  assert got["steps"] == sum(r["steps"] for r in records) and got["epochs"] == n


def test_summarize_hand_cases():
  edge = [_record(e + 1, accuracy=a) for e, a in enumerate([0.05, 0.12, 0.13])]
  assert 0.12 < 0.13 - 0.01 and metrics.summarize(edge)["first_within_epoch"] == 2  # float rounding
  # a peak above the final accuracy counts as within
  accs = [0.50, 0.91, 0.96, 0.92, 0.93]
  records = [
      _record(e + 1, accuracy=a, steps=10 * (e + 1), train_time_s=1.0) for e, a in enumerate(accs)
  ]
  got = metrics.summarize(records)
  assert got["final_accuracy"] == 0.93 and got["best_accuracy"] == 0.96
  assert got["first_within_epoch"] == 3
  assert got["first_within_steps"] == 60 and got["first_within_train_time_s"] == 3.0
  assert metrics.summarize(records[:1])["first_within_epoch"] == 1
  with pytest.raises(ValueError, match="at least one epoch"):
    metrics.summarize([])
  with pytest.raises(ValueError, match="consecutive"):
    metrics.summarize([_record(1), _record(3)])


def test_write_summary_from_the_run_directory(tmp_path):
  with metrics.MetricsWriter(tmp_path / metrics.METRICS_FILE) as log:
    for epoch, acc in enumerate([0.2, 0.6, 0.65], start=1):
      log.write(_record(epoch, accuracy=acc))
  summary = metrics.write_summary(tmp_path)
  assert json.loads((tmp_path / metrics.SUMMARY_FILE).read_text()) == summary
  assert summary["first_within_epoch"] == 3 and summary["eval_time_s"] == 1.5
  assert sorted(p.name for p in tmp_path.iterdir()) == [metrics.METRICS_FILE, metrics.SUMMARY_FILE]


# ------------------------------------------------------------------ strict JSON, divergence


def _strict_loads(text):
  """json.loads that refuses the NaN / Infinity tokens (RFC 8259 JSON)."""
  def refuse(token):
    raise ValueError(f"non-standard JSON token {token}")
  return json.loads(text, parse_constant=refuse)


def test_non_finite_optional_values_are_written_as_null(tmp_path):
  path = tmp_path / metrics.METRICS_FILE
  nan = float("nan")
  with metrics.MetricsWriter(path) as log:
    log.write(_record(1, diversity=nan, test_loss=float("inf"), statistic=np.float32("nan"),
                      series=[1.0, -np.inf, {"x": nan}], method="sgd"))
    assert log.records[0]["diversity"] is None
  line = path.read_text().splitlines()[0]
  assert "NaN" not in line and "Infinity" not in line
  got = _strict_loads(line)
  assert got == _record(1, diversity=None, test_loss=None, statistic=None,
                        series=[1.0, None, {"x": None}], method="sgd")
  assert metrics.read_records(path) == [got]


@pytest.mark.parametrize("field, value", [("train_loss", float("nan")), ("lr", float("inf")),
                                          ("train_loss", np.float32("-inf"))])
def test_non_finite_required_value_is_refused(tmp_path, field, value):
  path = tmp_path / metrics.METRICS_FILE
  with metrics.MetricsWriter(path) as log:
    log.write(_record(1))
    with pytest.raises(ValueError, match=f"metric '{field}' is .* in epoch 2") as info:
      log.write(_record(2, **{field: value}))
    assert "\n" not in str(info.value) and log.last_epoch == 1
  assert [r["epoch"] for r in run_records(path.parent)] == [1]


@pytest.mark.parametrize(
    "record, expected",
    [
        (_record(3), None),
        (_record(3, diversity=None, ok=True, name="x"), None),
        (_record(3, train_loss=float("nan")), "epoch 3: train_loss is nan"),
        (_record(3, lr=float("inf"), train_loss=float("nan")), "epoch 3: lr is inf"),
        (_record(3, test_loss=np.float32("-inf")), "epoch 3: test_loss is -inf"),
        (_record(3, diversity=np.array(float("nan"))), "epoch 3: diversity is nan"),
    ],
)
def test_check_finite_names_the_first_non_finite_quantity(record, expected):
  message = metrics.check_finite(record)
  if expected is None:
    assert message is None
  else:
    assert message.startswith(expected) and "diverged" in message and "\n" not in message


def _finite_reference(records):
  """Totals by numpy over the epochs given (the finite ones before the divergence)."""
  return {
      "epochs": records[-1]["epoch"],
      "steps": int(np.sum([r["steps"] for r in records])),
      "examples": int(np.sum([r["examples"] for r in records])),
      "final_accuracy": records[-1]["test_accuracy"],
      "best_accuracy": float(np.max([r["test_accuracy"] for r in records])),
      "final_batch_size": records[-1]["batch_size"],
  }


def test_diverged_summary_covers_finite_epochs_and_claims_no_within_result(tmp_path):
  finite = [_record(e, accuracy=a) for e, a in ((1, 0.4), (2, 0.7), (3, 0.69))]
  summary = metrics.summarize(finite, diverged_at_epoch=4)
  assert summary["diverged_at_epoch"] == 4
  assert {k: summary[k] for k in _finite_reference(finite)} == _finite_reference(finite)
  assert [summary[k] for k in summary if k.startswith("first_within")] == [None] * 5
  assert metrics.summarize(finite)["first_within_epoch"] == 2  # the ordinary claim it withholds
  assert metrics.summarize(finite)["diverged_at_epoch"] is None
  # Later records passed along are cut off at the divergence.
  assert metrics.summarize(finite + [_record(4, accuracy=0.1)], diverged_at_epoch=4) == summary


def test_summary_of_a_file_with_non_finite_epochs_reports_the_divergence(tmp_path):
  """A metrics file from before strict JSON: NaN tokens read back, the run is summarised as diverged."""
  records = [_record(1, accuracy=0.5), _record(2, accuracy=0.6), _record(3, accuracy=0.1, train_loss=float("nan"))]
  (tmp_path / metrics.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
  assert np.isnan(metrics.read_records(tmp_path / metrics.METRICS_FILE)[2]["train_loss"])
  summary = metrics.write_summary(tmp_path)
  assert summary["diverged_at_epoch"] == 3 and summary["first_within_epoch"] is None
  assert summary["final_accuracy"] == 0.6 and summary["epochs"] == 2
  assert _strict_loads((tmp_path / metrics.SUMMARY_FILE).read_text()) == summary


def test_divergence_in_the_first_epoch(tmp_path):
  summary = metrics.write_summary(tmp_path, [], diverged_at_epoch=1)
  assert summary["diverged_at_epoch"] == 1 and summary["epochs"] == 0 and summary["steps"] == 0
  assert summary["final_accuracy"] is None and summary["best_accuracy"] is None
  assert _strict_loads((tmp_path / metrics.SUMMARY_FILE).read_text()) == summary
  for bad in (0, True, 1.5):
    with pytest.raises(ValueError, match="diverged_at_epoch must be an int >= 1"):
      metrics.summarize([], diverged_at_epoch=bad)


def test_summary_final_batch_is_the_last_steps_and_a_language_model_adds_its_losses():
  import math  # pylint: disable=g-import-not-at-top

  records = [_record(1, batch_size=16), _record(2, batch_size=16)]
  records[0]["last_batch_size"], records[1]["last_batch_size"] = 16, 64  # grew inside epoch 2
  for r, loss in zip(records, (2.5, 2.25)):
    r.update(test_loss=loss, total_examples=100 * r["epoch"])
    r.update(metrics.token_fields(r, tokens_per_example=32))
  summary = metrics.summarize(records)
  assert summary["final_batch_size"] == 64
  assert summary["final_test_loss"] == 2.25
  assert summary["final_bits_per_char"] == pytest.approx(2.25 / math.log(2))
  assert summary["total_tokens"] == 200 * 32
  assert summary["total_steps"] == summary["steps"] == sum(r["steps"] for r in records)
  assert summary["total_examples"] == summary["examples"] == sum(r["examples"] for r in records)
  plain = metrics.summarize([_record(1, batch_size=16)])  # no last_batch_size: the epoch's start
  assert plain["final_batch_size"] == 16 and "final_test_loss" not in plain
