"""``--tensorboard DIR``: each epoch's record as TensorBoard scalars (tensorboardX, no TensorFlow).

A run writes its event files into ``DIR/<name of --out>``, so the runs of one
``--compare`` (``OUT/<method>``) appear as one TensorBoard run per method. Each
epoch adds one point (step = the epoch, 1-based) to every scalar of
:data:`SCALARS` that the record holds as a finite number; the rule's statistic and
requested batch size exist only in epochs that measured them. Look at them with
``tensorboard --logdir DIR``::

    board = EpochBoard("tb", "divebatch")
    board.write({"epoch": 1, "batch_size": 16, "lr": 0.05, "train_loss": 1.2, "test_accuracy": 0.6})
    board.close()
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
    "steps": "progress/steps",
    "total_examples": "progress/examples",
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
