"""Atomic, checksummed training checkpoints: an orbax pytree plus a JSON dict of host state.

Layout of ``directory``::

    step_00000012/            a committed checkpoint (the only kind ever read)
      state/                  orbax StandardCheckpointer: params, optimizer state, rest
      host.json               epoch, sampler position, rng, metrics so far, ...
      manifest.json           size and sha256 of every file above
      COMMITTED               written last: the step and the manifest's own sha256
    .tmp-step_00000014/       a save in progress, or one killed half-way (ignored)

A save writes everything into a fresh ``.tmp-*`` directory, writes the commit
marker last and then renames the directory to ``step_<step>`` (one atomic
``rename`` on a POSIX file system). Restore reads only ``step_*`` directories that
hold the marker, so a process killed at any point of a save (SIGKILL included)
leaves the previous checkpoint as the latest; the next save removes leftovers.
The protocol covers process death, not power loss (no ``fsync`` of orbax's
files).

Integrity: restore checks every file against the manifest (and the manifest
against the marker) before reading it. Without ``step=``, it walks the committed
checkpoints newest first, names each damaged one in one line (logged as a
warning and returned in :attr:`Checkpoint.skipped`) and restores the newest
intact one. A checkpoint is never written from a diverged state: saving refuses
NaN or inf in the parameters, model state or optimizer state
(:func:`first_non_finite_leaf`). Retention (``keep``) never removes the
checkpoint it has just written nor the newest intact one, so when newer
checkpoints are damaged the last good one survives.

Several JAX processes (``jax.distributed``): every process calls save and
restore with the same arguments; orbax writes each process's part of the state,
process 0 writes ``host.json``, the manifest and the marker, and barriers
(``multihost_utils.sync_global_devices``) keep the processes in step. The
directory must be on a file system all processes share. With one process no
barrier runs.

Round trips are exact: arrays come back with their dtypes (bfloat16, int32,
typed PRNG keys) and bits, in the structure of the target (NamedTuple optimizer
states, ``nnx.State``)::

    >>> import os, tempfile
    >>> import jax.numpy as jnp
    >>> from divebatch_jax.train.checkpoints import restore_checkpoint, save_checkpoint
    >>> directory = tempfile.mkdtemp()
    >>> state = {"params": {"w": jnp.arange(3.0, dtype=jnp.bfloat16)}, "step": jnp.int32(7)}
    >>> path = save_checkpoint(directory, 3, state, {"epoch": 3})
    >>> path.name, sorted(os.listdir(path))
    ('step_00000003', ['COMMITTED', 'host.json', 'manifest.json', 'state'])
    >>> ckpt = restore_checkpoint(directory, state)
    >>> ckpt.step, ckpt.host["epoch"], ckpt.skipped, ckpt.state["params"]["w"]
    (3, 3, (), Array([0, 1, 2], dtype=bfloat16))
    >>> save_checkpoint(directory, 4, {"w": jnp.array([1.0, jnp.nan])}, {})
    Traceback (most recent call last):
    ...
    ValueError: refusing to save checkpoint step 4: state leaf ['w'] holds NaN or inf
    (the run diverged); nothing was written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from divebatch_jax.train import safe_files, schema
from divebatch_jax.transform import AdaptiveBatchState

PyTree = Any
HostCheck = Callable[[Any, int], "str | None"]  # (host.json's value, step) -> what is wrong, or None

COMMIT_MARKER = "COMMITTED"
STATE_DIR = "state"
HOST_FILE = "host.json"
MANIFEST_FILE = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20
_log = logging.getLogger(__name__)


class DamagedCheckpointError(ValueError):
  """A committed checkpoint whose files do not match its manifest (or no intact one is left)."""


class Checkpoint(NamedTuple):
  """A restored checkpoint: its step, the state pytree, the host-state dict and the
  one-line reports of the newer, damaged checkpoints skipped to reach it."""

  step: int
  state: PyTree
  host: dict
  skipped: tuple[str, ...] = ()


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
  """Where the committed checkpoint of ``step`` lives: ``directory/step_<step:08d>``."""
  return Path(directory) / f"step_{step:08d}"


def committed_steps(directory: str | os.PathLike) -> list[int]:
  """Sorted steps of the committed checkpoints in ``directory`` ([] if it is absent).

  Committed means the marker is there; whether the files are intact is
  :func:`verify_checkpoint`'s question.
  """
  directory = Path(directory)
  if not directory.is_dir():
    return []
  steps = []
  for child in directory.iterdir():
    match = _STEP_DIR.match(child.name)
    if match:
      safe_files.refuse_symlink(child, "checkpoint folder")
    if match and (child / COMMIT_MARKER).is_file():
      steps.append(int(match.group(1)))
  return sorted(steps)


def latest_step(directory: str | os.PathLike) -> int | None:
  """The newest committed step (intact or not), or None when there is none."""
  steps = committed_steps(directory)
  return steps[-1] if steps else None


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _file_digests(root: Path) -> dict[str, dict]:
  """``{relative path: {"size": bytes, "sha256": hex}}`` of every file under ``root``."""
  return {
      path.relative_to(root).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
      for path in sorted(root.rglob("*"))
      if path.is_file()
  }


def _read_json(path: Path) -> Any:
  """The JSON value of the regular file ``path`` (a symlink or special file: UnsafeFileError)."""
  return json.loads(safe_files.read_text(path))


def verify_checkpoint(path: str | os.PathLike, *, check_host: HostCheck | None = None) -> str | None:
  """None when the committed checkpoint at ``path`` is intact, else what is wrong (one line).

  Intact: the marker is JSON naming the manifest's sha256 (and the folder's step);
  the manifest matches it and passes :func:`~divebatch_jax.train.schema.manifest_problem`
  (a non-empty list of files inside the folder, ``host.json`` among them); every
  file it lists exists with its recorded size and sha256; and, with ``check_host``,
  ``check_host(host, step)`` returns None for the ``host.json`` read back (the
  caller's schema of its host state). Files the manifest does not list are ignored
  (nothing reads them).
  """
  path = Path(path)
  match = _STEP_DIR.match(path.name)
  step = int(match.group(1)) if match else None
  try:
    marker = _read_json(path / COMMIT_MARKER)
  except (OSError, ValueError):
    marker = None
  if (problem := schema.marker_problem(marker, step)) is not None:
    return f"{COMMIT_MARKER} is unreadable or {problem}"
  manifest_path = path / MANIFEST_FILE
  if not manifest_path.is_file():
    return f"{MANIFEST_FILE} is missing"
  if _sha256(manifest_path) != marker["manifest_sha256"]:
    return f"{MANIFEST_FILE} does not match the checksum in {COMMIT_MARKER}"
  try:
    manifest = _read_json(manifest_path)
  except (OSError, ValueError):
    return f"{MANIFEST_FILE} is not JSON"
  if (problem := schema.manifest_problem(manifest, step, (HOST_FILE,))) is not None:
    return f"{MANIFEST_FILE} {problem}"
  problem = _files_problem(path, manifest["files"])
  if problem is None and check_host is not None:
    try:
      host = _read_json(path / HOST_FILE)
    except (OSError, ValueError):
      return f"{HOST_FILE} is not JSON"
    if (problem := check_host(host, step)) is not None:
      return f"{HOST_FILE}: {problem}"
  return problem


def _files_problem(path: Path, files: dict) -> str | None:
  """What is wrong with the files the manifest lists (None: each has its size and sha256)."""
  for name, expected in files.items():
    file = path / name
    if not file.is_file():
      return f"{name} is missing"
    size = file.stat().st_size
    if size != expected["size"]:
      return f"{name} has {size} bytes, the manifest records {expected['size']}"
    if _sha256(file) != expected["sha256"]:
      return f"{name} does not match its sha256 in the manifest"
  return None


def _without_batch_bookkeeping(state: PyTree) -> PyTree:
  """``state`` with each :class:`AdaptiveBatchState` cut down to its ``inner_state``."""
  def strip(node):
    if not isinstance(node, AdaptiveBatchState):
      return node
    empty = AdaptiveBatchState(*(None for _ in AdaptiveBatchState._fields))
    return empty._replace(inner_state=_without_batch_bookkeeping(node.inner_state))

  return jax.tree.map(strip, state, is_leaf=lambda node: isinstance(node, AdaptiveBatchState))


def first_non_finite_leaf(state: PyTree) -> str | None:
  """The path (``jax.tree_util.keystr``) of the first floating leaf holding NaN or inf, or None.

  Checked: every floating leaf (params, model state, the inner optimizer's state
  such as momentum). Not checked: integer, boolean and PRNG-key leaves, and the
  batch-size bookkeeping of ``adaptive_batch`` (the fields of
  :class:`~divebatch_jax.transform.AdaptiveBatchState` other than
  ``inner_state``), which holds NaN by design until a statistic is measured.
  Works on jax arrays (sharded or not, every process calling it), NumPy arrays
  and Python scalars::

      >>> import jax.numpy as jnp, numpy as np
      >>> first_non_finite_leaf({"w": jnp.array([1.0, jnp.nan])})
      "['w']"
      >>> first_non_finite_leaf({"b": np.array([np.inf]), "w": jnp.ones(2), "step": 3})
      "['b']"
      >>> print(first_non_finite_leaf({"w": 1.0, "step": 3}))
      None
  """
  floating = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(_without_batch_bookkeeping(state)):
    x = leaf if hasattr(leaf, "dtype") else np.asarray(leaf)
    if jnp.issubdtype(x.dtype, jnp.inexact):
      floating.append((path, x))
  on_device = [x for _, x in floating if isinstance(x, jax.Array)]
  # One executable for every device leaf (per state structure), not one per leaf shape.
  device_flags = iter(jax.device_get(_all_finite(on_device)) if on_device else ())
  for path, x in floating:
    finite = next(device_flags) if isinstance(x, jax.Array) else np.all(np.isfinite(x))
    if not finite:
      return jax.tree_util.keystr(path)
  return None


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _barrier(name: str) -> None:
  """All processes meet here (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


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
    state: a pytree of arrays (jax or numpy), scalars or typed PRNG keys; the
      leaves :func:`first_non_finite_leaf` checks must be finite.
    host: a JSON-serialisable dict (NaN and inf allowed).
    keep: how many committed checkpoints to keep (>= 1), None for all. Neither
      the checkpoint just written nor the newest intact one is ever removed,
      even when ``keep`` newer steps exist.

  Returns:
    The committed checkpoint's path.

  Raises:
    ValueError: a bad argument, or NaN/inf in a checked leaf of ``state`` (a
      diverged run); nothing is written then.
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
  bad_leaf = first_non_finite_leaf(state)
  if bad_leaf is not None:
    raise ValueError(
        f"refusing to save checkpoint step {step}: state leaf {bad_leaf} holds NaN or inf "
        "(the run diverged); nothing was written."
    )

  directory = Path(directory).absolute()  # orbax refuses relative paths
  primary = jax.process_index() == 0
  final = checkpoint_path(directory, step)
  tmp = directory / f"{_TMP_PREFIX}{final.name}"
  if primary:
    directory.mkdir(parents=True, exist_ok=True)
    safe_files.refuse_symlink(final, "checkpoint folder")
    for leftover in directory.glob(_TMP_PREFIX + "*"):
      if leftover.is_symlink() or not leftover.is_dir():
        leftover.unlink()  # the link only, never what it names
      else:
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()  # O_EXCL: a folder of our own (a leftover in its place was removed above)
  _barrier(f"divebatch_checkpoint_{step}_prepared")

  with safe_files.disk_full_as_os_error(tmp):
    checkpointer = ocp.StandardCheckpointer()
    try:
      checkpointer.save(tmp / STATE_DIR, state)
      checkpointer.wait_until_finished()
    finally:
      checkpointer.close()
  _barrier(f"divebatch_checkpoint_{step}_state_written")

  if primary:
    _write_synced(tmp / HOST_FILE, host_json)
    manifest = json.dumps({"step": step, "files": _file_digests(tmp)}, indent=1, sort_keys=True)
    _write_synced(tmp / MANIFEST_FILE, manifest)
    _write_synced(tmp / COMMIT_MARKER, json.dumps({"step": step, "manifest_sha256": _sha256(tmp / MANIFEST_FILE)}))

    if final.exists():  # hide the old copy first: a crash in between loses only this step
      _remove(final)
    os.rename(tmp, final)
    _sync_directory(directory)

    if keep is not None:
      _retire(directory, step, keep)
  _barrier(f"divebatch_checkpoint_{step}_committed")
  return final


def _retire(directory: Path, saved: int, keep: int) -> None:
  """Removes the committed checkpoints beyond the newest ``keep``, sparing two of them.

  Spared: ``saved`` (just written, so intact and finite) and, when ``saved`` is
  older than some of the doomed ones (a run resumed from an earlier step), the
  newest intact one among those, since it is then the newest intact checkpoint.
  """
  doomed = [s for s in committed_steps(directory)[:-keep] if s != saved]
  newer = [s for s in doomed if s > saved]
  spared = next((s for s in reversed(newer) if verify_checkpoint(checkpoint_path(directory, s)) is None), None)
  for old in doomed:
    if old != spared:
      _remove(checkpoint_path(directory, old))


def _remove(checkpoint: Path) -> None:
  """Deletes a checkpoint: renamed out of sight first, so a crash never leaves half of it."""
  safe_files.refuse_symlink(checkpoint, "checkpoint folder")
  hidden = checkpoint.parent / f"{_TMP_PREFIX}removed-{checkpoint.name}-{uuid.uuid4().hex}"
  os.rename(checkpoint, hidden)
  shutil.rmtree(hidden)


def _newest_intact(directory: Path, candidates: list[int], check_host: HostCheck | None) -> tuple[int | None, list[str]]:
  """The first intact step of ``candidates`` and one line per damaged one before it."""
  damaged = []
  for step in candidates:
    path = checkpoint_path(directory, step)
    problem = verify_checkpoint(path, check_host=check_host)
    if problem is None:
      return step, damaged
    damaged.append(f"checkpoint {path} is damaged: {problem}.")
  return None, damaged


def intact_step(
    directory: str | os.PathLike, *, step: int | None = None, check_host: HostCheck | None = None
) -> tuple[int | None, tuple[str, ...]]:
  """``(the newest intact committed step, or step, lines naming the damaged ones skipped)``.

  ``(None, ())`` when no committed checkpoint exists (a fresh run). Every process
  agrees on the step (process 0 checks the files). ``check_host`` as for
  :func:`verify_checkpoint`: a host state it refuses makes the checkpoint damaged.
  Raises as :func:`restore_checkpoint` does.
  """
  directory = Path(directory).absolute()
  steps = committed_steps(directory)
  if step is not None and step not in steps:
    raise ValueError(
        f"step {step!r} has no committed checkpoint in {directory}; committed: {steps}."
    )
  if not steps:
    return None, ()
  chosen, damaged = None, []
  if jax.process_index() == 0:  # one process reads and checks the files; the others follow
    chosen, damaged = _newest_intact(directory, [step] if step is not None else steps[::-1], check_host)
  if jax.process_count() > 1:
    agreed = multihost_utils.broadcast_one_to_all(np.int32(-1 if chosen is None else chosen))
    chosen = None if int(agreed) < 0 else int(agreed)
  if chosen is None:
    if step is not None:
      raise DamagedCheckpointError(damaged[0] if damaged else f"checkpoint step {step} is damaged (see process 0).")
    raise DamagedCheckpointError(
        f"no intact checkpoint in {directory}: "
        + (" ".join(damaged) if damaged else "every committed checkpoint is damaged (see process 0).")
        + f" Remove {directory} to start the run over."
    )
  return chosen, tuple(f"{line} Skipped; restoring step {chosen}." for line in damaged)


def restore_checkpoint(
    directory: str | os.PathLike, target: PyTree, *, step: int | None = None, verified: bool = False
) -> Checkpoint | None:
  """Restores the newest intact committed checkpoint (or ``step``) into ``target``'s structure.

  Args:
    directory: the checkpoint directory.
    target: a pytree shaped like the saved state: concrete arrays or
      ``jax.ShapeDtypeStruct`` leaves (only shapes, dtypes and shardings are used).
    step: a committed step to restore; None for the newest intact one.
    verified: ``step`` was just found intact by :func:`intact_step` (its files are
      not hashed a second time).

  Returns:
    A :class:`Checkpoint` whose ``skipped`` names the newer damaged checkpoints
    passed over (each also logged as a warning), or None when ``step`` is None
    and no committed checkpoint exists (a fresh run).

  Raises:
    DamagedCheckpointError: ``step`` is damaged, or every committed checkpoint is.
    ValueError: ``step`` is not committed, or the target's structure differs
      from the saved one.
  """
  directory = Path(directory).absolute()
  if verified and step is not None:
    chosen, skipped = step, ()
  else:
    chosen, skipped = intact_step(directory, step=step)
  if chosen is None:
    return None
  for line in skipped:
    _log.warning("%s", line)

  path = checkpoint_path(directory, chosen)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  checkpointer = ocp.StandardCheckpointer()
  try:
    state = checkpointer.restore(path / STATE_DIR, abstract)
  except ValueError as err:
    raise ValueError(f"checkpoint {path} does not match the target's structure: {err}") from err
  finally:
    checkpointer.close()
  return Checkpoint(chosen, state, read_host(path), skipped)


def read_host(path: str | os.PathLike) -> dict:
  """The host state of the checkpoint at ``path`` (check it with :func:`verify_checkpoint` first)."""
  return _read_json(Path(path) / HOST_FILE)
