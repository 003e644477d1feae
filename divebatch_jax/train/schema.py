"""What a run reads back from its folder, checked before use: types and ranges, one line.

A checkpoint's files may match their manifest and still hold nonsense (a forged or
hand-edited ``host.json``, a manifest of ``{}``); a ``config.json`` may hold ``null`` or
``"lr": "0.05"``. Each reader calls one function here before using what it read:

* :func:`marker_problem`, :func:`manifest_problem`: a checkpoint's ``COMMITTED`` and
  ``manifest.json`` (:func:`divebatch_jax.train.checkpoints.verify_checkpoint` skips a
  checkpoint whose files fail, as it skips damaged bytes);
* :func:`host_problem`: the host state ``divebatch-train`` stores (epoch, sampler
  position, device batch, a partial epoch's progress, the epochs' records);
* ``config.json``: :func:`divebatch_jax.train.config.field_problem` per field, the
  one type rule of the flags, called by :func:`divebatch_jax.train.resume.read_stored`;
* ``metrics.jsonl``: :func:`divebatch_jax.train.metrics.validate_record` per line;
* the device-batch cache: :func:`divebatch_jax.train.device_batch.problem_with`.

Each returns None for a good value, else what is wrong, in one line::

    >>> host_problem({"epoch": 3, "sampler": [3, 0], "device_batch": 32}, 3, max_device_batch=64, num_examples=300)
    >>> host_problem({"epoch": -3, "sampler": [3, 0], "device_batch": 0}, 3, max_device_batch=64, num_examples=300)
    "'epoch' must be the checkpoint's step 3, got -3"
"""

from __future__ import annotations

import math
import numbers
import re
from pathlib import PurePosixPath
from typing import Any

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
HOST_KEYS = ("epoch", "sampler", "device_batch")  # what every divebatch-train checkpoint holds
OPTIONAL_HOST_KEYS = ("partial", "records")
PARTIAL_KEYS = ("batch_size", "start_summary", "steps", "rows", "examples", "loss_sum", "seconds")


def is_int(value: Any) -> bool:
  """A JSON integer (not a bool)."""
  return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
  """A finite JSON number (not a bool)."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _int_problem(name: str, value: Any, low: int, high: int | None = None) -> str | None:
  if is_int(value) and value >= low and (high is None or value <= high):
    return None
  accepted = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
  return f"{name!r} must be {accepted}, got {value!r}"


def marker_problem(marker: Any, step: int | None) -> str | None:
  """``COMMITTED``: ``{"step": step, "manifest_sha256": hex}``."""
  if not isinstance(marker, dict) or not isinstance(marker.get("manifest_sha256"), str):
    return "names no manifest checksum"
  if step is not None and "step" in marker and marker["step"] != step:
    return f"names step {marker['step']!r}, not the folder's step {step}"
  return None


def manifest_problem(manifest: Any, step: int | None, required: tuple[str, ...] = ()) -> str | None:
  """``manifest.json``: ``{"step": step, "files": {relative path: {"size": int >= 0, "sha256": hex}}}``,
  the files non-empty and holding ``required``; no path leaves the checkpoint folder."""
  if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
    return "must be an object whose 'files' lists at least one file"
  if step is not None and "step" in manifest and manifest["step"] != step:
    return f"names step {manifest['step']!r}, not the folder's step {step}"
  for name, entry in manifest["files"].items():
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or ".." in parts or "\\" in name:
      return f"lists the path {name!r}, outside the checkpoint folder"
    if not isinstance(entry, dict) or _int_problem("size", entry.get("size"), 0) is not None:
      return f"gives {name!r} no size (an integer >= 0)"
    if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
      return f"gives {name!r} no sha256 (64 hex digits)"
  missing = [name for name in required if name not in manifest["files"]]
  return f"does not list {missing}" if missing else None


def _partial_problem(partial: Any) -> str | None:
  if not isinstance(partial, dict) or sorted(partial) != sorted(PARTIAL_KEYS):
    return f"'partial' must be an object of {list(PARTIAL_KEYS)}, got {partial!r}"
  if not isinstance(partial["start_summary"], dict):
    return "'partial.start_summary' must be an object"
  for name in ("steps", "rows", "examples"):
    if (problem := _int_problem(f"partial.{name}", partial[name], 0)) is not None:
      return problem
  if (problem := _int_problem("partial.batch_size", partial["batch_size"], 1)) is not None:
    return problem
  if not is_real(partial["loss_sum"]) or not is_real(partial["seconds"]) or partial["seconds"] < 0:
    return "'partial.loss_sum' and 'partial.seconds' must be finite numbers (seconds >= 0)"
  return None


def host_problem(host: Any, step: int, *, max_device_batch: int | None = None,
                 num_examples: int | None = None) -> str | None:
  """The host state of ``divebatch-train``'s checkpoint ``step``: ``epoch`` equal to ``step``,
  ``sampler`` ``[epoch, position]`` with ``0 <= position <= num_examples``,
  ``device_batch`` in ``[1, max_device_batch]``, optional ``partial`` (a stopped epoch's
  progress) and ``records`` (the epochs' metrics.jsonl records, 1 .. epoch); no other key."""
  if not isinstance(host, dict):
    return f"must be a JSON object, got {type(host).__name__}"
  unknown = sorted(set(host) - set(HOST_KEYS) - set(OPTIONAL_HOST_KEYS))
  missing = [key for key in HOST_KEYS if key not in host]
  if unknown or missing:
    return f"must hold {list(HOST_KEYS)} (and optionally {list(OPTIONAL_HOST_KEYS)}); missing {missing}, unknown {unknown}"
  if host["epoch"] != step or not is_int(host["epoch"]):
    return f"'epoch' must be the checkpoint's step {step}, got {host['epoch']!r}"
  sampler = host["sampler"]
  if (not isinstance(sampler, list) or len(sampler) != 2 or sampler[0] != step
      or _int_problem("position", sampler[1], 0, num_examples) is not None):
    return f"'sampler' must be [{step}, position] with position in [0, {num_examples}], got {sampler!r}"
  if (problem := _int_problem("device_batch", host["device_batch"], 1, max_device_batch)) is not None:
    return problem
  if host.get("partial") is not None and (problem := _partial_problem(host["partial"])):
    return problem
  return _records_problem(host.get("records"), step)


def _records_problem(records: Any, epoch: int) -> str | None:
  if records is None:
    return None
  from divebatch_jax.train import metrics  # pylint: disable=g-import-not-at-top

  if not isinstance(records, list) or len(records) != epoch:
    return f"'records' must list the {epoch} epochs' records, got {type(records).__name__} of {len(records) if isinstance(records, list) else '?'}"
  for number, record in enumerate(records, start=1):
    try:
      metrics.validate_record(record)
    except ValueError as err:
      return f"'records' entry {number}: {err}"
    if record["epoch"] != number:
      return f"'records' entry {number} is epoch {record['epoch']!r}"
  return None
