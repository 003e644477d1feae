"""``cbs.json``, the curve ``divebatch-train cbs`` measures, read back for ``--method cbs-warmup``.

Apart from :mod:`divebatch_jax.train.cbs` (which trains branches through the loop), so
that building a policy (:mod:`divebatch_jax.train.methods`) does not import the loop.
"""

from __future__ import annotations

import json
from pathlib import Path

CBS_JSON = "cbs.json"


def read_curve(path: str | Path) -> tuple[list[int], list[int]]:
  """(examples, CBS) of a cbs.json, for ``--method cbs-warmup`` (a directory: its cbs.json)."""
  path = Path(path)
  if path.is_dir():
    path = path / CBS_JSON
  if not path.is_file():
    raise FileNotFoundError(f"--cbs-file {path}: no such file (divebatch-train cbs --out RUN writes RUN/{CBS_JSON}).")
  try:
    points = json.loads(path.read_text())["points"]
    examples, values = [int(p["examples"]) for p in points], [int(p["cbs"]) for p in points]
  except (ValueError, KeyError, TypeError) as err:
    raise ValueError(f"--cbs-file {path}: not a {CBS_JSON} of divebatch-train cbs ({err}).") from None
  return examples, values
