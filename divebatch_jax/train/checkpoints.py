"""Atomic training checkpoints: an orbax pytree plus a JSON dict of host state.

Layout of ``directory``::

    step_00000012/            a committed checkpoint (the only kind ever read)
      state/                  orbax StandardCheckpointer: params, optimizer state, rest
      host.json               epoch, sampler position, rng, metrics so far, ...
      COMMITTED               written last, after everything above
    .tmp-step_00000014-<id>/  a save in progress, or one killed half-way (ignored)

A save writes everything into a fresh ``.tmp-*`` directory, writes the commit
marker last and then renames the directory to ``step_<step>`` (one atomic
``rename`` on a POSIX file system). Restore reads only ``step_*`` directories that
hold the marker, so a process killed at any point of a save (SIGKILL included)
leaves the previous checkpoint as the latest; the next save removes leftovers.
The protocol covers process death, not power loss (no ``fsync`` of orbax's
files). Single-controller only: with several JAX processes it refuses to run.

Round trips are exact: arrays come back with their dtypes (bfloat16, int32,
typed PRNG keys) and bits, in the structure of the target (NamedTuple optimizer
states, ``nnx.State``)::

    save_checkpoint("runs/a/ckpt", 3, {"params": params, "opt": opt_state}, {"epoch": 3})
    ckpt = restore_checkpoint("runs/a/ckpt", {"params": params, "opt": opt_state})
    ckpt.step, ckpt.host["epoch"]                 # 3, 3
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

PyTree = Any

COMMIT_MARKER = "COMMITTED"
STATE_DIR = "state"
HOST_FILE = "host.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


class Checkpoint(NamedTuple):
  """A restored checkpoint: its step, the state pytree and the host-state dict."""

  step: int
  state: PyTree
  host: dict


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
  """Where the committed checkpoint of ``step`` lives: ``directory/step_<step:08d>``."""
  return Path(directory) / f"step_{step:08d}"


def committed_steps(directory: str | os.PathLike) -> list[int]:
  """Sorted steps of the committed checkpoints in ``directory`` ([] if it is absent)."""
  directory = Path(directory)
  if not directory.is_dir():
    return []
  steps = []
  for child in directory.iterdir():
    match = _STEP_DIR.match(child.name)
    if match and (child / COMMIT_MARKER).is_file():
      steps.append(int(match.group(1)))
  return sorted(steps)


def latest_step(directory: str | os.PathLike) -> int | None:
  """The newest committed step, or None when there is none."""
  steps = committed_steps(directory)
  return steps[-1] if steps else None


def _check_single_process() -> None:
  if jax.process_count() > 1:
    raise NotImplementedError(
        f"checkpoints support one JAX process, got jax.process_count() = {jax.process_count()}."
    )


def _write_synced(path: Path, text: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def _sync_directory(directory: Path) -> None:
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    state: PyTree,
    host: dict,
    *,
    keep: int | None = 3,
) -> Path:
  """Atomically saves ``state`` and ``host`` as checkpoint ``step``; keeps the newest ``keep``.

  Args:
    directory: the checkpoint directory (created if needed; relative to the
      working directory when relative).
    step: a non-negative int (the CLI uses the epoch). Saving a step that
      already exists replaces it.
    state: a pytree of arrays (jax or numpy), scalars or typed PRNG keys.
    host: a JSON-serialisable dict (NaN and inf allowed).
    keep: how many committed checkpoints to keep (>= 1), None for all.

  Returns:
    The committed checkpoint's path.
  """
  if isinstance(step, bool) or not isinstance(step, int) or step < 0:
    raise ValueError(f"step must be a non-negative int, got {step!r}.")
  if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
    raise ValueError(f"keep must be a positive int or None, got {keep!r}.")
  if not isinstance(host, dict):
    raise ValueError(f"host must be a dict, got {type(host).__name__}.")
  try:
    host_json = json.dumps(host, indent=1, sort_keys=True)
  except (TypeError, ValueError) as err:
    raise ValueError(f"host must be JSON-serialisable: {err}") from err
  _check_single_process()

  directory = Path(directory).absolute()  # orbax refuses relative paths
  directory.mkdir(parents=True, exist_ok=True)
  for leftover in directory.glob(_TMP_PREFIX + "*"):
    shutil.rmtree(leftover, ignore_errors=True)
  final = checkpoint_path(directory, step)
  tmp = directory / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex}"
  tmp.mkdir()

  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(tmp / STATE_DIR, state)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()
  _write_synced(tmp / HOST_FILE, host_json)
  _write_synced(tmp / COMMIT_MARKER, json.dumps({"step": step}))

  if final.exists():  # hide the old copy first: a crash in between loses only this step
    _remove(final)
  os.rename(tmp, final)
  _sync_directory(directory)

  if keep is not None:
    for old in committed_steps(directory)[:-keep]:
      _remove(checkpoint_path(directory, old))
  return final


def _remove(checkpoint: Path) -> None:
  """Deletes a checkpoint: renamed out of sight first, so a crash never leaves half of it."""
  hidden = checkpoint.parent / f"{_TMP_PREFIX}removed-{checkpoint.name}-{uuid.uuid4().hex}"
  os.rename(checkpoint, hidden)
  shutil.rmtree(hidden)


def restore_checkpoint(
    directory: str | os.PathLike, target: PyTree, *, step: int | None = None
) -> Checkpoint | None:
  """Restores the newest committed checkpoint (or ``step``) into ``target``'s structure.

  Args:
    directory: the checkpoint directory.
    target: a pytree shaped like the saved state: concrete arrays or
      ``jax.ShapeDtypeStruct`` leaves (only shapes, dtypes and shardings are used).
    step: a committed step to restore; None for the newest.

  Returns:
    A :class:`Checkpoint`, or None when ``step`` is None and no committed
    checkpoint exists (a fresh run).
  """
  _check_single_process()
  steps = committed_steps(directory)
  if step is None:
    if not steps:
      return None
    step = steps[-1]
  elif step not in steps:
    raise ValueError(
        f"step {step!r} has no committed checkpoint in {directory}; committed: {steps}."
    )
  path = checkpoint_path(Path(directory).absolute(), step)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  checkpointer = ocp.StandardCheckpointer()
  try:
    state = checkpointer.restore(path / STATE_DIR, abstract)
  except ValueError as err:
    raise ValueError(f"checkpoint {path} does not match the target's structure: {err}") from err
  finally:
    checkpointer.close()
  host = json.loads((path / HOST_FILE).read_text(encoding="utf-8"))
  return Checkpoint(step, state, host)
