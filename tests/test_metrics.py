"""metrics.jsonl writing/resuming and summary.json against brute-force references."""

import json

import numpy as np
import pytest

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


def _lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


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
      assert [r["epoch"] for r in _lines(path)] == list(range(1, epoch + 1))  # before close
  got = _lines(path)
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
  got = _lines(path)
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
  assert [r["epoch"] for r in _lines(path)] == [1, 2]


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
