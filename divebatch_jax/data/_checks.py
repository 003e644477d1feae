"""Argument checks shared by the data modules: clear errors that name the argument."""

from __future__ import annotations

import operator
from typing import Any


def as_int(name: str, value: Any) -> int:
  """``value`` as a plain int; TypeError for bools, floats and other non-integers.

  Accepts Python ints, NumPy integers and 0-d integer arrays (``operator.index``).
  """
  if isinstance(value, bool):
    raise TypeError(f"{name} must be an int, got the bool {value!r}.")
  try:
    return operator.index(value)
  except TypeError:
    raise TypeError(
        f"{name} must be an int, got {value!r} of type {type(value).__name__}; "
        f"pass a whole number such as int({name})."
    ) from None


def int_in_range(name: str, value: Any, low: int, high: int | None = None) -> int:
  """``value`` as an int in ``[low, high]`` (no upper bound when ``high`` is None)."""
  value = as_int(name, value)
  if value < low or (high is not None and value > high):
    accepted = f"[{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"{name} must be an int in {accepted}, got {value}.")
  return value
