"""Before a run writes into ``--out``: is there a run already, and may it be resumed as asked?

A run directory holds ``config.json`` (the run's :class:`TrainConfig`),
``metrics.jsonl`` and ``checkpoints/``. Two checks guard it:

* :func:`run_exists`: a run exists once it has a finished epoch (a complete line
  in ``metrics.jsonl``) or a committed checkpoint. A run that failed before its
  first epoch (an empty ``metrics.jsonl``, a ``config.json``) leaves no run, so
  retrying into the same ``--out`` is not refused.
* :func:`check_resume`: ``--resume`` continues the stored run exactly, so every
  setting that changes the training trajectory must equal the stored one
  (:data:`TRAJECTORY_FIELDS`); the others (:data:`HARMLESS_FIELDS`) may change
  and are reported as notes. ``--epochs`` is harmless except under
  ``--schedule cosine``, whose period is the number of epochs.

:func:`check_out_dir` runs both for a config::

    >>> import dataclasses, json, tempfile
    >>> from pathlib import Path
    >>> from divebatch_jax.train.config import TrainConfig
    >>> from divebatch_jax.train.resume import check_out_dir
    >>> out = Path(tempfile.mkdtemp())
    >>> config = TrainConfig(out=str(out), epochs=30)
    >>> check_out_dir(out, config)                    # nothing there yet: no notes
    []
    >>> _ = (out / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    >>> _ = (out / "metrics.jsonl").write_text('{"epoch": 1}\\n')   # one finished epoch
    >>> check_out_dir(out, config)
    Traceback (most recent call last):
    ...
    FileExistsError: --out ... already holds a run (...): pass --resume to continue it, or choose another --out.
    >>> check_out_dir(out, config.replace(resume=True, epochs=40))
    ['--resume: --epochs changed from 30 to 40 (the trajectory so far is unchanged).']
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from divebatch_jax.train import checkpoints, metrics, safe_files
from divebatch_jax.train.config import ConfigError, TrainConfig, field_problem, flag_name

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"

# Settings a resumed run may change (epochs: see check_resume); the README lists them.
HARMLESS_FIELDS = (
    "epochs", "data_dir", "eval_batch_size", "out", "resume", "checkpoint_every", "progress",
    "tensorboard", "compilation_cache",
)
# Every other setting changes what the run computes (a new field too, until it is listed above):
# resuming with another value is refused. num_test_examples is one: the accuracy series
# would mix two test sets.
TRAJECTORY_FIELDS = tuple(
    f.name for f in dataclasses.fields(TrainConfig) if f.name not in HARMLESS_FIELDS
)


def _as_json(config: TrainConfig) -> dict[str, Any]:
  """The config as ``config.json`` stores it (tuples as lists)."""
  return json.loads(json.dumps(dataclasses.asdict(config)))


def check_resume(stored: dict, new: TrainConfig) -> list[str]:
  """Compares a stored ``config.json`` with the config of the run resuming it.

  Changes to :data:`TRAJECTORY_FIELDS` (and to ``epochs`` under a cosine
  schedule) raise one :class:`ConfigError` line naming each flag with its stored
  and new value. Changes to :data:`HARMLESS_FIELDS` come back as notes, one per
  flag (``resume`` itself is not reported). A field the stored file lacks is
  compared with its default; a stored field that is no longer a setting is
  noted and ignored.

  Example::

      >>> import dataclasses
      >>> stored = dataclasses.asdict(TrainConfig(lr=0.05, epochs=30))   # as config.json holds it
      >>> check_resume(stored, TrainConfig(lr=0.05, epochs=40, resume=True))
      ['--resume: --epochs changed from 30 to 40 (the trajectory so far is unchanged).']
      >>> check_resume(stored, TrainConfig(lr=0.1, epochs=30, resume=True))
      Traceback (most recent call last):
      ...
      divebatch_jax.train.config.ConfigError: --resume: --lr was 0.05 in the stored run, now 0.1. That changes the training trajectory, ...
  """
  if not isinstance(stored, dict):
    raise ConfigError(f"--resume: the stored {CONFIG_FILE} must hold a JSON object, got {type(stored).__name__}.")
  stored = json.loads(json.dumps(stored))  # as config.json holds it: tuples as lists
  current = _as_json(new)
  defaults = _as_json(TrainConfig())
  refused, notes = [], []
  for name, value in current.items():
    old = stored.get(name, defaults[name])
    if old == value:
      continue
    if name == "epochs" and new.schedule == "cosine":
      refused.append(f"--epochs was {old!r} in the stored run, now {value!r} (the cosine schedule's period)")
    elif name not in HARMLESS_FIELDS:
      refused.append(f"{flag_name(name)} was {old!r} in the stored run, now {value!r}")
    elif name != "resume":
      notes.append(f"--resume: {flag_name(name)} changed from {old!r} to {value!r} (the trajectory so far is unchanged).")
  notes += [
      f"--resume: the stored {CONFIG_FILE} has the setting {name!r}, which this version does not know; ignored."
      for name in stored if name not in current
  ]
  if refused:
    raise ConfigError(
        f"--resume: {'; '.join(refused)}. That changes the training trajectory, so the "
        "run cannot continue from its checkpoint: pass the stored value(s), or start a new run "
        "in another --out."
    )
  return notes


def run_exists(out: str | Path) -> bool:
  """True when ``out`` holds a run: a complete epoch line in ``metrics.jsonl`` or a committed checkpoint.

  An absent or empty ``metrics.jsonl`` (or one holding only a torn first line)
  and no committed checkpoint mean no run: a run that failed before finishing
  its first epoch does not block a retry.
  """
  out = Path(out)
  try:  # a symlink or a special file there: refused in one line (safe_files)
    if b"\n" in safe_files.read_regular(out / metrics.METRICS_FILE):
      return True
  except FileNotFoundError:
    pass
  return bool(checkpoints.committed_steps(out / CHECKPOINTS_DIR))


def check_out_dir(out: str | Path, config: TrainConfig) -> list[str]:
  """Both checks for a run about to write into ``out``; returns notes to print.

  Without ``config.resume``: FileExistsError when :func:`run_exists`. With it:
  :func:`check_resume` against ``out/config.json`` when that file exists (a
  missing one means a fresh start; an unreadable one is a ConfigError, see
  :func:`read_stored`).
  """
  out = Path(out)
  if not config.resume:
    if run_exists(out):
      raise FileExistsError(
          f"--out {out} already holds a run (epochs in {metrics.METRICS_FILE} or committed "
          f"checkpoints in {CHECKPOINTS_DIR}/): pass --resume to continue it, or choose another --out."
      )
    return []
  stored = read_stored(out)
  return [] if stored is None else check_resume(stored, config)


def write_config(out: str | Path, config: TrainConfig) -> None:
  """``out/config.json``, written to a temporary name and renamed: a full disk leaves the
  previous file whole."""
  safe_files.write_atomic(Path(out) / CONFIG_FILE, json.dumps(dataclasses.asdict(config), indent=1))


def read_stored(out: str | Path) -> dict | None:
  """``out/config.json`` as a dict (None when absent); one ConfigError line naming the file
  when it is not JSON, not an object (``null`` included) or holds a setting of the wrong
  type (:func:`~divebatch_jax.train.config.field_problem`)."""
  stored_path = Path(out) / CONFIG_FILE
  if not stored_path.exists() and not stored_path.is_symlink():
    return None
  fix = "restore the file, or delete it to resume without the check."
  try:
    stored = json.loads(safe_files.read_text(stored_path))
  except ValueError as err:  # not UTF-8, not JSON
    raise ConfigError(
        f"--resume: {stored_path} is not valid JSON ({err}), so the stored run's settings cannot "
        f"be compared; {fix}"
    ) from None
  if not isinstance(stored, dict):
    raise ConfigError(f"--resume: {stored_path} must hold a JSON object of settings, got {json.dumps(stored)[:40]}; {fix}")
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  for name in sorted(fields & set(stored)):
    if (problem := field_problem(name, stored[name])) is not None:
      raise ConfigError(f"--resume: {stored_path}: the setting {name!r} {problem}; {fix}")
  return stored


def resumed_config(config: TrainConfig, given: set[str]) -> TrainConfig:
  """The config a ``--resume`` run continues with: every setting stored in
  ``config.out/config.json``, then the fields named in ``given`` (the flags passed) from
  ``config``, so ``--out D --resume`` alone continues the run in D as it was started.

  Without a stored config.json ``config`` is returned as it is (a fresh start). Stored
  settings this version does not know are left out (:func:`check_resume` notes them);
  :func:`check_resume` then refuses a given flag that changes the trajectory.

      resumed_config(TrainConfig(out="runs/a", resume=True), {"out", "resume"})
      # TrainConfig(dataset="cifar10", model="cnn", ..., out="runs/a", resume=True)
  """
  stored = read_stored(config.out)
  if stored is None:
    return config
  if not isinstance(stored, dict):
    raise ConfigError(f"--resume: the stored {CONFIG_FILE} must hold a JSON object, got {type(stored).__name__}.")
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  known = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in fields}
  kept = {name: getattr(config, name) for name in (given & fields) | {"out", "resume"}}
  return dataclasses.replace(TrainConfig(**known), **kept)


def reconcile_metrics(path: str | Path, host: dict, echo=print) -> None:
  """Checks ``metrics.jsonl`` against the checkpoint a ``--resume`` restores, before training.

  The file must hold epochs 1 .. ``host["epoch"]`` (the committed ones; later lines
  are a killed run's and are trained again). When a line is torn, missing or not a
  record, the file is rewritten from the checkpoint's own records
  (``host["records"]``), with a note; a checkpoint without them (from an older
  version) makes it one ConfigError line instead. Either way no epoch trains on top
  of a file whose totals would be wrong.
  """
  path, epoch = Path(path), host["epoch"]
  try:
    epochs = [r["epoch"] for r in metrics.read_records(path)]
    problem = None if epochs[:epoch] == list(range(1, epoch + 1)) else (
        f"holds epochs {_span(epochs)}, not 1..{epoch} of the checkpoint it resumes")
  except FileNotFoundError:
    problem = "is missing"
  except ValueError as err:
    problem = f"is damaged ({err})"
  if problem is None:
    return
  records = host.get("records")
  if records is None or len(records) != epoch:
    raise ConfigError(
        f"--resume: {path} {problem}, and the checkpoint of epoch {epoch} holds no records to "
        "repair it from: restore the file, or start the run over in another --out.")
  safe_files.write_atomic(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records), sync=True)
  echo(f"note: {path} {problem}; rewrote epochs 1..{epoch} from the checkpoint's records "
       "(later epochs train again).")


def _span(epochs: list[int]) -> str:
  return f"{epochs[0]}..{epochs[-1]}" if epochs else "none"
