"""Argument and data checks shared by the data modules: clear errors that name the argument."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np


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


def check_labels(
    name: str, labels: np.ndarray, num_classes: int | None = None, *, per_token: bool = False
) -> None:
  """Class labels: a 1-D integer array, every value in ``[0, num_classes)``.

  With ``per_token`` also ``(n, T)``: one target per token of each example (a
  language model's next tokens). Float labels are refused, never truncated (``2.7``
  is not a class). With ``num_classes`` None only the lower bound is checked (the
  caller infers the count). ValueError naming ``name``, the offending value and the
  accepted range.
  """
  if per_token and labels.ndim not in (1, 2):
    raise ValueError(
        f"{name} must be (n,) class labels or (n, T) per-token targets, got shape {labels.shape}."
    )
  if not per_token and labels.ndim != 1:
    raise ValueError(f"{name} must be a 1-D array of class labels, got shape {labels.shape}.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
        f"{name} must hold integer class labels, got dtype {labels.dtype}: float labels are "
        "refused, not truncated (convert whole-number labels with .astype(np.int64))."
    )
  if labels.size == 0:
    return
  low, high = int(labels.min()), int(labels.max())
  if low < 0:
    accepted = f"[0, {num_classes})" if num_classes is not None else ">= 0"
    raise ValueError(f"{name} holds the negative label {low}; labels must be integers in {accepted}.")
  if num_classes is not None and high >= num_classes:
    raise ValueError(
        f"{name} holds the label {high}, outside [0, {num_classes}) for num_classes = {num_classes}."
    )


def check_features(name: str, features: np.ndarray) -> None:
  """Features: a numeric (bool, integer or real) array with no NaN or inf.

  ValueError naming ``name`` and, for non-finite values, how many there are.
  """
  if features.dtype.kind not in "biuf":
    raise ValueError(f"{name} must be a numeric (bool, integer or float) array, got dtype {features.dtype}.")
  if features.dtype.kind == "f":
    bad = features.size - int(np.count_nonzero(np.isfinite(features)))
    if bad:
      raise ValueError(f"{name} holds {bad} NaN/inf value(s) of {features.size}; features must be finite.")
