"""Shared test settings and helpers.

* a session fixture: measurements the CLI keeps between runs go to a temporary folder;
* :func:`run_records`: a run's ``metrics.jsonl``, read as plain JSON lines;
* :data:`CHECKPOINT_DAMAGE`: ways to damage a committed checkpoint on disk, each with
  the words :func:`divebatch_jax.train.checkpoints.verify_checkpoint` reports it by.

Tests import the helpers with ``from conftest import ...`` (pytest puts ``tests/`` on
``sys.path``). Nothing here imports ``divebatch_jax``: the file names below are the
checkpoint layout that ``divebatch_jax/train/checkpoints.py`` documents.
"""

import json
import os
from pathlib import Path
from typing import Callable, NamedTuple

import pytest


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
  """``DIVEBATCH_CACHE_DIR`` for this session (and the subprocesses it starts), so runs in
  one session share the device-batch measurement and nothing lands in the home folder."""
  previous = os.environ.get("DIVEBATCH_CACHE_DIR")
  os.environ["DIVEBATCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("divebatch_cache"))
  yield
  if previous is None:
    os.environ.pop("DIVEBATCH_CACHE_DIR", None)
  else:
    os.environ["DIVEBATCH_CACHE_DIR"] = previous


# ------------------------------------------------------------------ run outputs


def run_records(out) -> list[dict]:
  """The records of ``out/metrics.jsonl``, one dict per line (``json.loads``, not the
  library's reader, so a test checks the file as any JSON tool reads it)."""
  return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def write_cbs_file(path, examples, cbs) -> Path:
  """A cbs.json as ``divebatch-train cbs`` writes it (the fields ``--cbs-file`` reads)."""
  points = [{"epoch": i, "examples": x, "tokens": 0, "losses": {}, "cbs": c} for i, (x, c) in enumerate(zip(examples, cbs))]
  Path(path).write_text(json.dumps({"points": points}))
  return Path(path)


# ------------------------------------------------------------------ damaged checkpoints


def _largest_state_file(checkpoint: Path) -> Path:
  return max((p for p in (checkpoint / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_array_byte(checkpoint: Path) -> Path:
  """Changes one byte in the middle of the largest array file: same size, other values."""
  target = _largest_state_file(checkpoint)
  data = bytearray(target.read_bytes())
  data[len(data) // 2] ^= 0xFF
  target.write_bytes(bytes(data))
  return target


def truncate_array_data(checkpoint: Path) -> Path:
  """Cuts the largest array file to half its size."""
  target = _largest_state_file(checkpoint)
  target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
  return target


def delete_orbax_metadata(checkpoint: Path) -> Path:
  target = checkpoint / "state" / "_METADATA"
  target.unlink()
  return target


def empty_host_json(checkpoint: Path) -> Path:
  target = checkpoint / "host.json"
  target.write_text("")
  return target


def invalid_host_json(checkpoint: Path) -> Path:
  target = checkpoint / "host.json"
  target.write_text('{"epoch": 3,')
  return target


def delete_manifest(checkpoint: Path) -> Path:
  target = checkpoint / "manifest.json"
  target.unlink()
  return target


def truncate_commit_marker(checkpoint: Path) -> Path:
  target = checkpoint / "COMMITTED"
  target.write_text('{"step": 3, "manif')
  return target


class Damage(NamedTuple):
  """``apply(checkpoint_dir)`` damages it and returns the file it changed; ``problem`` is
  part of the line ``verify_checkpoint`` reports for it."""

  apply: Callable[[Path], Path]
  problem: str


CHECKPOINT_DAMAGE = {
    "flipped byte in array data": Damage(flip_array_byte, "does not match its sha256"),
    "truncated array data": Damage(truncate_array_data, "bytes, the manifest records"),
    "deleted orbax metadata": Damage(delete_orbax_metadata, "state/_METADATA is missing"),
    "empty host.json": Damage(empty_host_json, "host.json has 0 bytes"),
    "invalid host.json": Damage(invalid_host_json, "host.json has"),
    "deleted manifest": Damage(delete_manifest, "manifest.json is missing"),
    "truncated commit marker": Damage(truncate_commit_marker, "COMMITTED is unreadable"),
}
