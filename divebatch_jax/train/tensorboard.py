"""``--tensorboard DIR``: each epoch's record as TensorBoard scalars (tensorboardX, no TensorFlow).

A run writes its event files into ``DIR/<name of --out>``, so the runs of one
``--compare`` (``OUT/<method>``) appear as one TensorBoard run per method. Each
epoch adds one point (step = the epoch, 1-based) to every scalar of
:data:`SCALARS` that the record holds as a finite number; the rule's statistic and
requested batch size exist only in epochs that measured them. Look at them with
``tensorboard --logdir DIR`` (here read back with TensorBoard's own reader)::

    >>> import tempfile
    >>> board = EpochBoard(tempfile.mkdtemp(), "divebatch")
    >>> board.write({"epoch": 1, "batch_size": 16, "lr": 0.05, "train_loss": 1.2, "diversity": None})
    >>> board.write({"epoch": 2, "batch_size": 64, "lr": 0.05, "train_loss": 0.8, "diversity": 0.02})
    >>> board.close()
    >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    >>> events = EventAccumulator(str(board.logdir))
    >>> _ = events.Reload()
    >>> sorted(events.Tags()["scalars"])
    ['batch/size', 'loss/train', 'optimizer/lr', 'rule/diversity']
    >>> [(point.step, point.value) for point in events.Scalars("batch/size")]
    [(1, 16.0), (2, 64.0)]
    >>> [point.step for point in events.Scalars("rule/diversity")]     # measured in epoch 2 only
    [2]
"""

from __future__ import annotations

import math
import os
from pathlib import Path

# record field -> TensorBoard tag
SCALARS = {
    "batch_size": "batch/size",
    "requested_batch_size": "batch/requested",
    "padding_fraction": "batch/padding_fraction",
    "lr": "optimizer/lr",
    "statistic": "rule/statistic",
    "diversity": "rule/diversity",
    "train_loss": "loss/train",
    "test_loss": "loss/test",
    "test_accuracy": "accuracy/test",
    "train_time_s": "time/train_s",
    "compile_s": "time/compile_s",
    "eval_time_s": "time/eval_s",
    "compile_stall_s": "time/compile_stall_s",
    "compilations": "compile/count",
    "steps": "progress/steps",  # this epoch's (metrics.jsonl's naming: total_* are cumulative)
    "examples": "progress/examples",
    "total_steps": "progress/total_steps",
    "total_examples": "progress/total_examples",
}


class EpochBoard:
  """An event-file writer for one run: ``DIR/run_name``, flushed after every epoch."""

  def __init__(self, directory: str | os.PathLike, run_name: str):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    self.logdir = Path(directory) / run_name
    self._writer = SummaryWriter(logdir=str(self.logdir))

  def write(self, record: dict) -> None:
    """One point per scalar the record holds (finite numbers only), at step ``record["epoch"]``."""
    for field, tag in SCALARS.items():
      value = record.get(field)
      if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        self._writer.add_scalar(tag, value, global_step=record["epoch"])
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()
