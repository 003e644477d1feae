"""What a run reports besides metrics.jsonl's training figures: compile_s apart from training,
TensorBoard event files (read back with TensorBoard's own reader), the cadence note."""

import json
from pathlib import Path

import pytest

from conftest import run_records
from divebatch_jax.train import config as config_lib
from divebatch_jax.train import main, methods, metrics, plots
from divebatch_jax.train.config import TrainConfig
from divebatch_jax.train.tensorboard import SCALARS

SMALL = [
    "--dataset", "synthetic", "--num-examples", "300", "--num-test-examples", "100",
    "--model", "logreg", "--epochs", "3", "--batch-size", "8", "--max-batch-size", "64",
    "--resize-every", "1", "--growth-every", "1", "--lr", "0.1",
]


def _record(epoch, train_time_s, compile_s=None, accuracy=0.5):
  record = {"epoch": epoch, "batch_size": 8, "lr": 0.1, "diversity": None, "train_loss": 0.5,
            "test_accuracy": accuracy, "train_time_s": train_time_s, "eval_time_s": 0.25,
            "steps": 10, "examples": 80, "compilations": 1}
  return record if compile_s is None else record | {"compile_s": compile_s}


def test_summary_keeps_compilation_apart_from_training():
  records = [_record(1, 4.0, 3.0, 0.5), _record(2, 1.5, 0.25, 0.8), _record(3, 1.0, 0.0, 0.805)]
  summary = metrics.summarize(records)
  assert summary["compile_s"] == 3.25 and summary["train_time_s"] == 6.5
  assert summary["train_time_excl_compile_s"] == 6.5 - 3.25
  assert summary["first_within_epoch"] == 2  # 0.8 >= 0.805 - 0.01
  assert summary["first_within_train_time_s"] == 5.5
  assert summary["first_within_train_time_excl_compile_s"] == (4.0 - 3.0) + (1.5 - 0.25)
  older = metrics.summarize([_record(1, 4.0), _record(2, 1.5)])  # a file from before compile_s
  assert older["compile_s"] is None and older["train_time_excl_compile_s"] is None
  assert metrics.summarize([], diverged_at_epoch=1)["compile_s"] == 0.0


def test_plot_time_axis_can_exclude_compilation():
  records = [_record(1, 4.0, 3.0), _record(2, 1.5, 0.25)]
  assert plots.x_values(records)["wall_time_s"] == [4.25, 4.25 + 1.75]
  assert plots.x_values(records, exclude_compile=True)["wall_time_s"] == [1.25, 1.25 + 1.5]


@pytest.mark.parametrize(
    "changes,expected",
    [
        (dict(method="divebatch", epochs=2, resize_every=5), "first in epoch 5"),
        (dict(method="divebatch", epochs=6, resize_every=5), None),
        (dict(method="adabatch", epochs=3, growth_every=5), "after epoch 5"),
        (dict(method="adabatch", epochs=6, growth_every=5), None),
        (dict(method="sgd", epochs=1), None),
        (dict(method="norm-test", epochs=1), None),
    ],
)
def test_a_cadence_longer_than_the_run_is_noted(changes, expected):
  config = config_lib.validate(TrainConfig(**changes))
  policy = methods.build_policy(config)
  note = config_lib.cadence_note(config, policy.needs_stats)
  if expected is None:
    assert note is None
  else:
    assert note.startswith("note: --method") and expected in note, note
    assert "batch size stays" in note or "keeps" in note


@pytest.mark.slow
def test_compare_writes_compile_s_and_one_tensorboard_run_per_method(tmp_path, capsys):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # pylint: disable=g-import-not-at-top

  out, board = tmp_path / "cmp", tmp_path / "tb"
  assert main(SMALL + ["--compare", "sgd,divebatch", "--out", str(out), "--tensorboard", str(board)]) == 0
  results = (out / "results.txt").read_text()
  assert "total steps" in results and "steps to target" in results and "compile s" in results
  assert sorted(p.name for p in board.iterdir()) == ["divebatch", "sgd"]
  for method in ("sgd", "divebatch"):
    records = run_records(out / method)
    summary = json.loads((out / method / "summary.json").read_text())
    for r in records:
      assert 0.0 <= r["compile_s"] <= r["train_time_s"]
    assert records[0]["compile_s"] > 0  # the CPU compiles every layout ahead, in epoch 1
    assert summary["compile_s"] == pytest.approx(sum(r["compile_s"] for r in records))
    events = EventAccumulator(str(board / method))
    events.Reload()
    expected = {tag for field, tag in SCALARS.items() if all(r.get(field) is not None for r in records)}
    assert expected <= set(events.Tags()["scalars"])
    for field, tag in SCALARS.items():
      if tag not in expected:
        continue
      points = events.Scalars(tag)
      assert [p.step for p in points] == [1, 2, 3], tag
      assert [p.value for p in points] == pytest.approx([float(r[field]) for r in records], rel=1e-6), tag
  wanted = {"batch/size", "batch/requested", "optimizer/lr", "rule/statistic", "loss/train", "loss/test",
            "accuracy/test", "time/train_s", "time/compile_s", "time/eval_s", "batch/padding_fraction",
            "compile/count"}
  dive = EventAccumulator(str(board / "divebatch"))
  dive.Reload()
  assert wanted <= set(dive.Tags()["scalars"])
  assert "compile" in capsys.readouterr().out


def test_plot_names_different_data_sets_and_a_constant_rate(tmp_path):
  run_dirs = []
  for name, dataset in (("a", "digits"), ("b", "cifar10")):
    run_dir = tmp_path / name
    with metrics.MetricsWriter(run_dir / metrics.METRICS_FILE) as log:
      log.write(_record(1, 1.0, 0.5))
    (run_dir / "config.json").write_text(json.dumps({"dataset": dataset}))
    run_dirs.append(run_dir)
  figure = plots.figure_of_runs(run_dirs)
  constant = "learning rate constant (0.1) in every run and epoch"  # a row that carries nothing: in the title
  assert figure.get_suptitle() == f"note: these runs trained on different data sets: cifar10, digits; {constant}"
  first = figure.axes[0]
  assert [t.get_text() for t in first.get_legend().get_texts()] == ["a (digits)", "b (cifar10)"]
  assert [a.get_ylabel() for a in figure.axes[:: len(plots.COLUMNS)]] == ["batch size", "test accuracy"]
  (tmp_path / "b" / "config.json").write_text(json.dumps({"dataset": "digits"}))
  assert plots.figure_of_runs(run_dirs).get_suptitle() == constant
