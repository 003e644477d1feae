"""plots: the PNG is written for several runs, and the panels hold the right data."""


import matplotlib.image
import numpy as np
import pytest

from divebatch_jax.train import metrics, plots


def _write_run(run_dir, accuracies, *, batch_sizes, diversity=None, steps=100):
  with metrics.MetricsWriter(run_dir / metrics.METRICS_FILE) as log:
    for i, (acc, b) in enumerate(zip(accuracies, batch_sizes)):
      log.write({
          "epoch": i + 1, "batch_size": b, "lr": 0.1 * b / batch_sizes[0],
          "diversity": None if diversity is None else diversity[i], "train_loss": 1.0 / (i + 1),
          "test_accuracy": acc, "train_time_s": 2.0 + i, "eval_time_s": 0.25,
          "steps": steps // (i + 1), "examples": 1000, "compilations": 1,
      })
  return run_dir


@pytest.fixture
def runs(tmp_path):
  sgd = _write_run(tmp_path / "sgd", [0.3, 0.5, 0.6, 0.62], batch_sizes=[128] * 4)
  dive = _write_run(
      tmp_path / "divebatch", [0.35, 0.55, 0.6, 0.61], batch_sizes=[128, 128, 512, 2048],
      diversity=[None, 2.0, float("inf"), 4.5],
  )
  single = _write_run(tmp_path / "one_epoch", [0.2], batch_sizes=[64])
  return [sgd, dive, single]


def test_png_written_for_several_runs(tmp_path, runs):
  out = plots.plot_runs(runs, tmp_path / "figs" / "compare.png")
  data = out.read_bytes()
  assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
  image = matplotlib.image.imread(out)
  assert image.shape[:2] == (1100, 1300)
  assert image[..., :3].std() > 0.05  # something was drawn


def test_panels_hold_each_runs_series(runs):
  records = {d.name: plots.load_run(d) for d in runs}
  fig = plots.draw_runs(records)
  axes = np.array(fig.axes).reshape(len(plots.ROWS), len(plots.COLUMNS))
  dive = records["divebatch"]
  steps = np.cumsum([r["steps"] for r in dive])
  wall = np.cumsum([r["train_time_s"] + r["eval_time_s"] for r in dive])

  def line(row, col, label):
    (found,) = [l for l in axes[row, col].get_lines() if l.get_label() == label]
    drawstyle = "steps-pre" if row in (0, 1) else "default"  # batch size and lr held per epoch
    assert found.get_drawstyle() == drawstyle
    return np.asarray(found.get_xdata(), float), np.asarray(found.get_ydata(), float)

  x, y = line(0, 1, "divebatch")  # batch size against optimizer steps
  np.testing.assert_array_equal(x, steps)
  np.testing.assert_array_equal(y, [128, 128, 512, 2048])
  x, y = line(2, 2, "divebatch")  # diversity against wall time: measured, finite points only
  np.testing.assert_allclose(x, wall[[1, 3]])
  np.testing.assert_array_equal(y, [2.0, 4.5])
  x, y = line(3, 0, "sgd")
  np.testing.assert_array_equal(x, [1, 2, 3, 4])
  np.testing.assert_array_equal(y, [0.3, 0.5, 0.6, 0.62])
  assert len(line(2, 0, "sgd")[0]) == 0  # never measured
  assert axes[0, 0].get_yscale() == "log" and axes[3, 0].get_yscale() == "linear"
  legend = axes[0, 0].get_legend()
  assert [t.get_text() for t in legend.get_texts()] == ["sgd", "divebatch", "one_epoch"]


def test_x_values_against_numpy(runs):
  records = plots.load_run(runs[1])
  xs = plots.x_values(records)
  assert xs["epoch"] == [1, 2, 3, 4]
  np.testing.assert_array_equal(xs["steps"], np.cumsum([100, 50, 33, 25]))
  np.testing.assert_allclose(xs["wall_time_s"], np.cumsum(np.arange(4) + 2.25))


def test_same_names_get_longer_labels(tmp_path):
  a = _write_run(tmp_path / "a" / "run", [0.5], batch_sizes=[32])
  b = _write_run(tmp_path / "b" / "run", [0.6], batch_sizes=[32])
  assert plots._labels([a, b]) == ["a/run", "b/run"]
  with pytest.raises(ValueError, match="distinct"):
    plots.plot_runs([a, a], tmp_path / "x.png")


def test_clear_errors(tmp_path, runs):
  (tmp_path / "empty_run").mkdir()
  with pytest.raises(FileNotFoundError, match="empty_run has no metrics.jsonl"):
    plots.plot_runs([runs[0], tmp_path / "empty_run"], tmp_path / "x.png")
  (tmp_path / "empty_run" / metrics.METRICS_FILE).write_text("")
  with pytest.raises(ValueError, match="holds no epoch yet"):
    plots.plot_runs([tmp_path / "empty_run"], tmp_path / "x.png")
  with pytest.raises(ValueError, match="must end in .png"):
    plots.plot_runs(runs, tmp_path / "x.pdf")
  with pytest.raises(ValueError, match="non-empty list"):
    plots.plot_runs(str(runs[0]), tmp_path / "x.png")
  assert not (tmp_path / "x.png").exists()
