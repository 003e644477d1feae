"""Per-epoch metrics (``metrics.jsonl``) and the run summary (``summary.json``).

One JSON object per epoch, one line each, flushed as it is written. The fields
every record must carry are :data:`REQUIRED_FIELDS`; a record may add more.
Conventions: accuracy is a fraction in [0, 1]; times, ``steps``, ``examples``,
``tokens`` and compilations count *this epoch only* (:func:`cumulative` sums them), and
``total_steps``, ``total_examples``, ``total_tokens`` count since the run's start (the
same names on the console, in summary.json and in TensorBoard's ``progress/*``); ``lr`` and
``batch_size`` are those the epoch started with (constant through the epoch for
epoch-level policies; a resize decided at the end of epoch ``e`` shows in epoch
``e + 1``); ``diversity`` is null where the epoch did not measure it.

Compilation is kept apart from training: :data:`COMPILE_FIELD` (``compile_s``,
written by ``divebatch-train`` in every record) is the part of ``train_time_s``
spent compiling (the compile-ahead charged to a run's first epoch where it runs
before training, plus any wait for a compile), so ``train_time_s - compile_s`` is
the time the steps took. The summary adds the totals and the within-1-point
figures without it; a file written before the field existed gives None there.

The file is strict JSON (``json.dumps(allow_nan=False)``): a NaN or inf in an
optional field (``diversity``, ``test_loss``, ...) is written as null, and one in
a required non-nullable field is refused, so a diverged epoch never reaches the
file. The loop checks each record with :func:`check_finite` first and, on a
message, stops the run and writes the summary with ``diverged_at_epoch``: the
summary then covers the finite epochs before it and claims no "within 1 point"
result.

The summary (Chen et al.'s convergence measure, ALGORITHMS.md §1): the final
accuracy ``a_T`` and the first epoch ``e`` with ``a_e >= a_T - 0.01`` ("within
1 point"), with the optimizer steps, examples and training seconds summed over
epochs ``<= e`` (here epoch 2: 0.92 is within 0.01 of the final 0.93)::

    >>> import os, tempfile
    >>> run = tempfile.mkdtemp()
    >>> with MetricsWriter(os.path.join(run, "metrics.jsonl")) as log:
    ...   for epoch, accuracy in [(1, 0.80), (2, 0.92), (3, 0.93)]:
    ...     _ = log.write({"epoch": epoch, "batch_size": 128, "lr": 0.1, "diversity": None,
    ...                    "train_loss": 1.0, "test_accuracy": accuracy, "train_time_s": 2.0,
    ...                    "eval_time_s": 0.5, "steps": 10, "examples": 1280, "compilations": 1})
    >>> summary = write_summary(run)             # also writes run/summary.json
    >>> summary["final_accuracy"], summary["first_within_epoch"], summary["first_within_steps"]
    (0.93, 2, 20)
    >>> sorted(os.listdir(run))
    ['metrics.jsonl', 'summary.json']
    >>> check_finite({"epoch": 4, "train_loss": float("nan")})
    'epoch 4: train_loss is nan (the run diverged; try a smaller --lr)'
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from divebatch_jax.train import safe_files

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
COMPILE_FIELD = "compile_s"  # seconds of train_time_s spent compiling (pinned name)
WITHIN = 0.01  # "within 1 point" of accuracy, as a fraction
_ROUNDING = 1e-9  # so that 0.92 counts as within 0.01 of 0.93 despite binary floats


class Field(NamedTuple):
  """A required metric: ``kind`` is int or float; ``nullable`` allows null."""

  kind: type
  nullable: bool
  doc: str


REQUIRED_FIELDS: dict[str, Field] = {
    "epoch": Field(int, False, "epoch index, consecutive within a file"),
    "batch_size": Field(int, False, "batch size the epoch started with"),
    "lr": Field(float, False, "learning rate the epoch started with"),
    "diversity": Field(float, True, "gradient diversity measured this epoch, null if not measured"),
    "train_loss": Field(float, False, "mean training loss over the epoch's real examples"),
    "test_accuracy": Field(float, False, "test accuracy after the epoch, a fraction in [0, 1]"),
    "train_time_s": Field(float, False, "seconds training this epoch (statistics included)"),
    "eval_time_s": Field(float, False, "seconds evaluating after this epoch"),
    "steps": Field(int, False, "optimizer steps this epoch"),
    "examples": Field(int, False, "training examples this epoch"),
    "compilations": Field(int, False, "XLA compilations this epoch"),
}
_NON_NEGATIVE = (
    "epoch", "batch_size", "lr", "train_time_s", "eval_time_s", "steps", "examples", "compilations"
)


def _coerce(name: str, value: Any, field: Field) -> Any:
  if value is None and field.nullable:
    return None
  if field.kind is int:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    coerced = int(value) if ok else None
  else:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    coerced = float(value) if ok else None
  if not ok:
    allowed = f"{field.kind.__name__}{' or null' if field.nullable else ''}"
    raise ValueError(f"metric {name!r} must be {allowed}, got {value!r}.")
  return coerced


def validate_record(record: dict) -> dict:
  """A JSON-ready copy of ``record`` (numpy scalars become Python numbers).

  Raises ValueError naming the field when a required field is missing, has the
  wrong type, is negative where a count or time is meant, or when
  ``test_accuracy`` is outside [0, 1].
  """
  if not isinstance(record, dict):
    raise ValueError(f"record must be a dict, got {type(record).__name__}.")
  missing = [name for name in REQUIRED_FIELDS if name not in record]
  if missing:
    raise ValueError(f"record is missing required metrics {missing}.")
  out = dict(record)
  for name, field in REQUIRED_FIELDS.items():
    out[name] = _coerce(name, record[name], field)
  for name in _NON_NEGATIVE:
    if out[name] < 0:
      raise ValueError(f"metric {name!r} must be >= 0, got {out[name]!r}.")
  if not 0.0 <= out["test_accuracy"] <= 1.0:
    raise ValueError(
        f"metric 'test_accuracy' must be a fraction in [0, 1], got {out['test_accuracy']!r}."
    )
  return out


def _check_consecutive(epochs: Sequence[int]) -> None:
  for before, after in zip(epochs, epochs[1:]):
    if after != before + 1:
      raise ValueError(f"epochs must be consecutive, got {before} then {after}.")


def _strict_json(value: Any) -> Any:
  """``value`` as plain JSON data: numpy/jax values as Python ones, NaN and inf as None."""
  if hasattr(value, "tolist"):  # numpy / jax scalars and arrays in extra fields
    value = value.tolist()
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if value is None or isinstance(value, (str, bool, int)):
    return value
  if isinstance(value, dict):
    return {str(k): _strict_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_strict_json(v) for v in value]
  raise TypeError(
      f"metric value {value!r} of type {type(value).__name__} is not JSON-serialisable."
  )


def _as_real(value: Any) -> float | None:
  """``value`` as a float when it is a real number (0-d numpy/jax arrays too), else None."""
  if isinstance(value, bool) or value is None:
    return None
  if isinstance(value, numbers.Real):
    return float(value)
  if hasattr(value, "dtype") and np.ndim(value) == 0 and np.issubdtype(value.dtype, np.number):
    return float(value)
  return None


def check_finite(record: dict) -> str | None:
  """None when every number in ``record`` is finite, else one line naming the first that is not.

  The loop calls it on each epoch's record before writing it and stops the run
  on a message (a NaN/inf loss means the weights diverged)::

      >>> check_finite({"epoch": 3, "lr": 0.1, "train_loss": float("inf")})
      'epoch 3: train_loss is inf (the run diverged; try a smaller --lr)'
      >>> print(check_finite({"epoch": 3, "lr": 0.1, "train_loss": 0.5, "diversity": None}))
      None
  """
  for name, value in record.items():
    number = _as_real(value)
    if number is not None and not math.isfinite(number):
      return f"epoch {record.get('epoch', '?')}: {name} is {number!r} (the run diverged; try a smaller --lr)"
  return None


def _parse_lines(text: str, path: Path) -> tuple[list[dict], int]:
  """Records of the complete lines and the byte length they span (a torn tail is dropped)."""
  *lines, _torn_tail = text.split("\n")  # the part after the last newline was cut short
  records, end = [], 0
  for number, line in enumerate(lines, start=1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as err:
      raise ValueError(f"{path}: line {number} is not valid JSON: {err}") from err
    end += len(line.encode("utf-8")) + 1
  return records, end


def _validate_line(record: Any, number: int, path: Path) -> dict:
  """:func:`validate_record` of line ``number`` of ``path``; its ValueError names both."""
  try:
    return validate_record(record)
  except ValueError as err:
    raise ValueError(f"{path}: line {number}: {err}") from None


def read_records(path: str | os.PathLike) -> list[dict]:
  """The validated records of a metrics file (an unfinished last line is ignored)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no metrics file at {path}.")
  records, _ = _parse_lines(safe_files.read_text(path), path)
  records = [_validate_line(r, number, path) for number, r in enumerate(records, start=1)]
  _check_consecutive([r["epoch"] for r in records])
  return records


class MetricsWriter:
  """Appends one validated JSON line per epoch to ``path``, flushed and fsynced.

  Opening an existing file (a resumed run) keeps its records and drops a torn
  last line. :meth:`write` skips (returns False for) epochs already in the file,
  so a run resumed from an earlier checkpoint does not duplicate them; a new
  epoch must follow the last one.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._records: list[dict] = []
    # No symlink followed, no FIFO blocked on (safe_files): one line instead.
    fd = safe_files.open_regular(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
    self._file = os.fdopen(fd, "a+", encoding="utf-8")
    try:
      self._file.seek(0)
      text = self._file.read()
      records, end = _parse_lines(text, self.path)
      self._records = [_validate_line(r, number, self.path) for number, r in enumerate(records, start=1)]
      _check_consecutive([r["epoch"] for r in self._records])
      if end != len(text.encode("utf-8")):
        os.ftruncate(fd, end)
    except BaseException:
      self._file.close()
      raise

  @property
  def records(self) -> list[dict]:
    """All records in the file, in order (a copy)."""
    return list(self._records)

  @property
  def last_epoch(self) -> int | None:
    return self._records[-1]["epoch"] if self._records else None

  def write(self, record: dict) -> bool:
    """Appends ``record``; False (and nothing written) if its epoch is already there.

    NaN and inf become null in optional fields; in a required non-nullable
    field they are refused (ValueError): stop a diverged run instead.
    """
    record = validate_record(record)
    for name, field in REQUIRED_FIELDS.items():
      if not field.nullable and field.kind is float and not math.isfinite(record[name]):
        raise ValueError(
            f"metric {name!r} is {record[name]!r} in epoch {record['epoch']}: metrics.jsonl holds "
            "finite epochs only; stop the run (check_finite) and pass diverged_at_epoch to write_summary."
        )
    last = self.last_epoch
    if last is not None and record["epoch"] <= last:
      return False
    if last is not None and record["epoch"] != last + 1:
      raise ValueError(f"record epoch must be {last + 1} (the next epoch), got {record['epoch']}.")
    record = _strict_json(record)
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())
    self._records.append(record)
    return True

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def token_fields(record: dict, tokens_per_example: int) -> dict:
  """A language model's extra fields: ``tokens`` (this epoch's predicted tokens),
  ``total_tokens`` (since the start) and ``bits_per_char`` = test_loss / ln 2 (the test
  loss is in nats per predicted token; a token is a character, or a byte)."""
  test_loss = record.get("test_loss")
  return {
      "tokens": record["examples"] * tokens_per_example,
      "total_tokens": record["total_examples"] * tokens_per_example,
      "bits_per_char": None if test_loss is None else test_loss / math.log(2),
  }


def cumulative(records: Iterable[dict], field: str) -> list[float]:
  """Running sum of a per-epoch field, e.g. ``cumulative(records, "steps")``."""
  total, out = 0, []
  for record in records:
    total += record[field]
    out.append(total)
  return out


def summarize(records: Sequence[dict], *, diverged_at_epoch: int | None = None) -> dict:
  """Final accuracy and when the run first came within :data:`WITHIN` of it.

  Returns a dict with ``final_accuracy``, ``best_accuracy``, totals (``epochs``,
  ``total_steps``, ``total_examples``, ``train_time_s``, ``eval_time_s``,
  ``compilations``; ``steps`` and ``examples`` repeat the totals for older readers),
  ``final_batch_size`` (the last optimizer step's), a language model's
  ``final_test_loss`` (nats per token), ``final_bits_per_char`` and ``total_tokens``, and ``within`` (0.01) with ``first_within_epoch``,
  ``first_within_steps``, ``first_within_examples`` and
  ``first_within_train_time_s``: the first epoch whose accuracy is at least
  ``final_accuracy - 0.01`` and the steps / examples / training seconds summed
  through it. ``compile_s`` is the compilation part of ``train_time_s``;
  ``train_time_excl_compile_s`` and ``first_within_train_time_excl_compile_s``
  are the training seconds without it (None where a record lacks ``compile_s``).

  Divergence: ``diverged_at_epoch`` (from the loop), or the first record that
  :func:`check_finite` flags (a file written before metrics were strict), ends
  the run there. The summary then covers the finite epochs before it only,
  ``diverged_at_epoch`` names the epoch and every ``first_within_*`` field is
  None: a diverged run has no final accuracy to converge to. With no finite
  epoch at all the accuracies and ``final_batch_size`` are None too.
  ``diverged_at_epoch`` is None for a run that did not diverge.
  """
  records = [validate_record(r) for r in records]
  _check_consecutive([r["epoch"] for r in records])
  flagged = next((r["epoch"] for r in records if check_finite(r) is not None), None)
  if diverged_at_epoch is not None:
    first_epoch = records[0]["epoch"] if records else 1
    if isinstance(diverged_at_epoch, bool) or not isinstance(diverged_at_epoch, int) or diverged_at_epoch < first_epoch:
      raise ValueError(
          f"diverged_at_epoch must be an int >= {first_epoch} (the first epoch), got {diverged_at_epoch!r}."
      )
  if flagged is not None:
    diverged_at_epoch = flagged if diverged_at_epoch is None else min(flagged, diverged_at_epoch)
  if diverged_at_epoch is not None:
    records = [r for r in records if r["epoch"] < diverged_at_epoch]
  elif not records:
    raise ValueError("records must hold at least one epoch.")
  accuracy = [r["test_accuracy"] for r in records]
  compile_time = _compile_seconds(records)
  steps, examples, train_time, eval_time = (
      cumulative(records, f) for f in ("steps", "examples", "train_time_s", "eval_time_s")
  )
  summary = {
      "final_accuracy": accuracy[-1] if records else None,
      "best_accuracy": max(accuracy) if records else None,
      "epochs": records[-1]["epoch"] if records else 0,
      "steps": steps[-1] if records else 0,
      "examples": examples[-1] if records else 0,
      "train_time_s": train_time[-1] if records else 0.0,
      "eval_time_s": eval_time[-1] if records else 0.0,
      "compilations": sum(r["compilations"] for r in records),
      COMPILE_FIELD: compile_time[-1] if records and compile_time else (0.0 if not records else None),
      "train_time_excl_compile_s": _minus(train_time, compile_time, -1) if records else 0.0,
      "total_steps": steps[-1] if records else 0,
      "total_examples": examples[-1] if records else 0,
      "final_batch_size": _last_step_batch(records[-1]) if records else None,
      **_language_model_fields(records),
      "within": WITHIN,
      "diverged_at_epoch": diverged_at_epoch,
  }
  if diverged_at_epoch is not None:
    return summary | dict.fromkeys(
        ("first_within_epoch", "first_within_steps", "first_within_examples", "first_within_train_time_s",
         "first_within_train_time_excl_compile_s")
    )
  first = next(i for i, a in enumerate(accuracy) if a >= accuracy[-1] - WITHIN - _ROUNDING)
  return summary | {
      "first_within_epoch": records[first]["epoch"],
      "first_within_steps": steps[first],
      "first_within_examples": examples[first],
      "first_within_train_time_s": train_time[first],
      "first_within_train_time_excl_compile_s": _minus(train_time, compile_time, first),
  }


def _last_step_batch(record: dict) -> int:
  """The batch size of the epoch's last optimizer step (``last_batch_size``; a file from
  before the field: the size the epoch started with)."""
  last = record.get("last_batch_size")
  return int(last) if last is not None else record["batch_size"]


def _language_model_fields(records: Sequence[dict]) -> dict:
  """A language model's final test loss (nats per token), bits per character and total
  tokens, where its records carry them (:func:`token_fields`); nothing otherwise."""
  if not records or "bits_per_char" not in records[-1]:
    return {}
  last = records[-1]
  return {"final_test_loss": last.get("test_loss"), "final_bits_per_char": last["bits_per_char"],
          "total_tokens": last.get("total_tokens")}


def _compile_seconds(records: Sequence[dict]) -> list[float] | None:
  """Cumulative ``compile_s``; None when a record lacks it (a file from before the field)."""
  values = [_as_real(r.get(COMPILE_FIELD)) for r in records]
  if any(v is None for v in values):
    return None
  return cumulative([{COMPILE_FIELD: v} for v in values], COMPILE_FIELD)


def _minus(train_time: list[float], compile_time: list[float] | None, index: int) -> float | None:
  return None if compile_time is None else train_time[index] - compile_time[index]


def write_summary(
    run_dir: str | os.PathLike,
    records: Sequence[dict] | None = None,
    *,
    diverged_at_epoch: int | None = None,
) -> dict:
  """Summarises ``records`` (default: ``run_dir/metrics.jsonl``) into ``run_dir/summary.json``.

  ``diverged_at_epoch`` as for :func:`summarize`. The file is strict JSON,
  written to a temporary name and renamed, so a reader never sees half of it.
  Returns the summary.
  """
  run_dir = Path(run_dir)
  records = read_records(run_dir / METRICS_FILE) if records is None else records
  summary = summarize(records, diverged_at_epoch=diverged_at_epoch)
  safe_files.write_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=1, allow_nan=False) + "\n")
  return summary
