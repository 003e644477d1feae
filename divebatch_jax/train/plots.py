"""Training curves of one or several runs as one PNG.

Rows: batch size, learning rate, gradient diversity, test accuracy (a row that
carries nothing is left out: a learning rate constant in every run, named in the
title instead, and a statistic no run measured). Columns:
against epochs, cumulative optimizer steps and cumulative wall time (training
plus evaluation seconds; with ``exclude_compile=True`` less each epoch's
``compile_s``, so that a run that compiles its layouts ahead in its first epoch
does not look slower per step). Each run is one line per panel, labelled with its
directory name; values are plotted at the end of each epoch, batch size and
learning rate as steps (each epoch's value held over that epoch). Diversity is
drawn only where it was measured (null, NaN and inf are skipped) with a marker
per point. Batch size (base 2), learning rate and diversity use a log scale when
they have values and all are positive (a row with none, e.g. diversity for SGD
runs only, stays linear and empty). Two runs of three epochs, compared::

    >>> import os, tempfile
    >>> from divebatch_jax.train.metrics import MetricsWriter
    >>> root = tempfile.mkdtemp()
    >>> def record(epoch, batch_size, diversity):   # the fields every metrics.jsonl line holds
    ...   return {"epoch": epoch, "batch_size": batch_size, "lr": 0.1, "diversity": diversity,
    ...           "train_loss": 1.0 / epoch, "test_accuracy": 0.3 * epoch, "train_time_s": 1.0,
    ...           "eval_time_s": 0.5, "steps": 1024 // batch_size, "examples": 1024, "compilations": 1,
    ...           "compile_s": 0.25 if epoch == 1 else 0.0}
    >>> for name, sizes, diversity in [("sgd", [16, 16, 16], None), ("divebatch", [16, 64, 256], 0.02)]:
    ...   with MetricsWriter(os.path.join(root, name, "metrics.jsonl")) as log:
    ...     for epoch, batch_size in enumerate(sizes, start=1):
    ...       _ = log.write(record(epoch, batch_size, diversity))
    >>> runs = [os.path.join(root, "sgd"), os.path.join(root, "divebatch")]
    >>> png = plot_runs(runs, os.path.join(root, "compare.png"))
    >>> png.name, png.read_bytes()[1:4]
    ('compare.png', b'PNG')
    >>> figure = draw_runs({"divebatch": load_run(runs[1])})   # a constant lr: no lr row
    >>> len(figure.axes), [axes.get_ylabel() for axes in figure.axes[::3]]
    (9, ['batch size', 'gradient diversity', 'test accuracy'])
    >>> figure._suptitle.get_text()
    'learning rate constant (0.1) in every run and epoch'
    >>> [axes.get_ylabel() for axes in draw_runs({"sgd": load_run(runs[0])}).axes[::3]]  # nothing measured
    ['batch size', 'test accuracy']
    >>> x_values(load_run(runs[1]))["wall_time_s"], x_values(load_run(runs[1]), exclude_compile=True)["wall_time_s"]
    ([1.5, 3.0, 4.5], [1.25, 2.75, 4.25])
    >>> plot_runs(runs, os.path.join(root, "compare_no_compile.png"), exclude_compile=True).is_file()
    True

Uses matplotlib's object API with the Agg canvas (no pyplot, no display).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from divebatch_jax.train import safe_files
from divebatch_jax.train.methods import DIVERSITY
from divebatch_jax.train.metrics import COMPILE_FIELD, METRICS_FILE, cumulative, read_records

ROWS = (
    ("batch_size", "batch size"),
    ("lr", "learning rate"),
    ("diversity", DIVERSITY),
    ("test_accuracy", "test accuracy"),
)
COLUMNS = (
    ("epoch", "epoch"),
    ("steps", "optimizer steps"),
    ("wall_time_s", "wall time (s, train + eval)"),
)
WALL_TIME_EXCL_COMPILE = "wall time (s, train + eval, compilation excluded)"
_LOG_BASE = {"batch_size": 2, "lr": 10, "diversity": 10}
_STEP_ROWS = ("batch_size", "lr")


def load_run(run_dir: str | os.PathLike) -> list[dict]:
  """The records of ``run_dir/metrics.jsonl``; a clear error when there are none."""
  path = Path(run_dir) / METRICS_FILE
  if not path.is_file():
    raise FileNotFoundError(f"run directory {run_dir} has no {METRICS_FILE} (looked for {path}).")
  records = read_records(path)
  if not records:
    raise ValueError(f"{path} holds no epoch yet.")
  return records


def x_values(records: Sequence[dict], *, exclude_compile: bool = False) -> dict[str, list[float]]:
  """The three x axes at the end of each epoch: epoch, cumulative steps, cumulative wall
  seconds (less the cumulative ``compile_s`` with ``exclude_compile``; a record without
  it counts 0)."""
  train, evaluation = cumulative(records, "train_time_s"), cumulative(records, "eval_time_s")
  compiled = cumulative([{"c": r.get(COMPILE_FIELD) or 0.0} for r in records], "c")
  if not exclude_compile:
    compiled = [0.0] * len(records)
  return {
      "epoch": [r["epoch"] for r in records],
      "steps": cumulative(records, "steps"),
      "wall_time_s": [t + e - c for t, e, c in zip(train, evaluation, compiled)],
  }


def _labels(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
  """Directory names; ``parent/name``, then the full path, where those repeat."""
  paths = [Path(os.path.abspath(d)) for d in run_dirs]
  labels = [p.name for p in paths]
  for longer in (lambda p: f"{p.parent.name}/{p.name}", str):
    labels = [longer(p) if labels.count(l) > 1 else l for p, l in zip(paths, labels)]
  return labels


def data_set_of(run_dir: str | os.PathLike) -> str | None:
  """The ``dataset`` a run's ``config.json`` names (None without a readable one)."""
  try:
    return json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8")).get("dataset")
  except (OSError, ValueError, AttributeError):
    return None


def shown_rows(runs: Mapping[str, Sequence[dict]]) -> tuple[tuple[str, str], ...]:
  """The rows of :data:`ROWS` that carry something: a learning rate that is one value in
  every run and epoch, and a statistic no run measured, are left out."""
  rates = {rec["lr"] for records in runs.values() for rec in records}
  measured = any(rec.get("diversity") is not None for records in runs.values() for rec in records)
  return tuple(
      (field, name) for field, name in ROWS
      if not (field == "lr" and len(rates) == 1) and not (field == "diversity" and not measured)
  )


def draw_runs(
    runs: Mapping[str, Sequence[dict]], *, exclude_compile: bool = False, title: str | None = None
) -> Figure:
  """A rows x 3 figure of ``{label: records}`` (see the module docstring), ``title`` above
  it; rows that carry nothing (:func:`shown_rows`) are left out, a constant learning
  rate named in the title instead."""
  if not runs:
    raise ValueError("runs must hold at least one run.")
  rows = shown_rows(runs)
  rates = {rec["lr"] for records in runs.values() for rec in records}
  if len(rates) == 1:
    constant = f"learning rate constant ({next(iter(rates)):.3g}) in every run and epoch"
    title = constant if title is None else f"{title}; {constant}"
  fig = Figure(figsize=(13.0, 2.75 * len(rows)), dpi=100, layout="constrained")
  axes = fig.subplots(len(rows), len(COLUMNS), sharex="col", squeeze=False)
  positive = {field: True for field, _ in rows}
  measured = {field: False for field, _ in rows}
  for label, records in runs.items():
    xs = x_values(records, exclude_compile=exclude_compile)
    for r, (field, _) in enumerate(rows):
      points = [
          (i, float(rec[field]))
          for i, rec in enumerate(records)
          if rec[field] is not None and math.isfinite(rec[field])
      ]
      positive[field] &= all(y > 0 for _, y in points)
      measured[field] |= bool(points)
      for c, (axis, _) in enumerate(COLUMNS):
        x = [xs[axis][i] for i, _ in points]
        y = [v for _, v in points]
        axes[r][c].plot(
            x,
            y,
            marker="o" if field == "diversity" else None,
            markersize=3,
            drawstyle="steps-pre" if field in _STEP_ROWS else "default",
            label=label,
        )
  for r, (field, name) in enumerate(rows):
    axes[r][0].set_ylabel(name)
    for c in range(len(COLUMNS)):
      if field in _LOG_BASE and positive[field] and measured[field]:
        axes[r][c].set_yscale("log", base=_LOG_BASE[field])
        if field == "batch_size":
          axes[r][c].yaxis.set_major_formatter(ScalarFormatter())
      axes[r][c].grid(True, alpha=0.3)
  for c, (axis, name) in enumerate(COLUMNS):
    axes[-1][c].set_xlabel(WALL_TIME_EXCL_COMPILE if axis == "wall_time_s" and exclude_compile else name)
  axes[-1][0].xaxis.set_major_locator(MaxNLocator(integer=True))
  axes[0][0].legend(loc="best", fontsize="small")
  if title is not None:
    fig.suptitle(title)
  return fig


def figure_of_runs(run_dirs: Sequence[str | os.PathLike], *, exclude_compile: bool = False) -> Figure:
  """:func:`draw_runs` of the runs in ``run_dirs``, labelled by directory; runs whose
  ``config.json`` name different data sets get their data set in the label and a note
  as the title."""
  if isinstance(run_dirs, (str, os.PathLike)) or not run_dirs:
    raise ValueError(f"run_dirs must be a non-empty list of run directories, got {run_dirs!r}.")
  labels = _labels(run_dirs)
  if len(set(labels)) != len(run_dirs):
    raise ValueError(f"run_dirs must name distinct directories, got {list(map(str, run_dirs))}.")
  data_sets = [data_set_of(d) for d in run_dirs]
  title = None
  if len({d for d in data_sets if d is not None}) > 1:
    labels = [f"{label} ({d})" if d is not None else label for label, d in zip(labels, data_sets)]
    title = "note: these runs trained on different data sets: " + ", ".join(sorted({d for d in data_sets if d}))
  runs = {label: load_run(d) for label, d in zip(labels, run_dirs)}
  return draw_runs(runs, exclude_compile=exclude_compile, title=title)


def plot_runs(
    run_dirs: Sequence[str | os.PathLike], out_path: str | os.PathLike, *, exclude_compile: bool = False
) -> Path:
  """Draws the runs in ``run_dirs`` (each holding a metrics.jsonl) into the PNG ``out_path``
  (:func:`figure_of_runs`); ``exclude_compile``: the wall-time axis without compilation."""
  out_path = Path(out_path)
  if out_path.suffix.lower() != ".png":
    raise ValueError(f"out_path must end in .png, got {str(out_path)!r}.")
  figure = figure_of_runs(run_dirs, exclude_compile=exclude_compile)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  safe_files.write_png(figure, out_path)
  return out_path
