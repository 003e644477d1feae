"""Sequence data: a text as ``(n, T)`` windows of token ids with their next-token targets.

A text of bytes ``c_0 c_1 ... c_{L-1}`` over a byte vocabulary V (the distinct bytes
of the text, sorted: 65 characters for tinyshakespeare) is cut into windows of
``T + 1`` consecutive tokens, ``stride`` apart (default ``T``: every token is
predicted once per epoch); window ``j`` starting at ``s_j = j·stride`` gives

    x_j = ids[s_j : s_j + T]          y_j = ids[s_j + 1 : s_j + T + 1]

so the model predicts ``y_j[t]`` from ``x_j[:t + 1]``. ``split="train"`` uses the
first ``1 − validation_fraction`` of the text, ``"validation"`` the rest (the usual
90/10 split), with the vocabulary taken from the whole text so both splits share it.
The windows are an :class:`~divebatch_jax.data.ArraySource` with integer ``x`` and
per-token ``y`` (``num_classes`` = |V|), stored as uint8 (|V| <= 256) and served as
int32 by the :class:`~divebatch_jax.data.Pipeline` (resident on the device when it
fits). A per-example loss is then the mean of a window's T token losses.

Example (4 windows of 8 tokens over 14 distinct characters; ``y`` is ``x`` one token on)::

    >>> from divebatch_jax import data
    >>> train = data.text_windows(b"to be or not to be, that is the question", context=8)
    >>> train.num_examples, train.num_classes
    (4, 14)
    >>> batch = train.gather([0, 1])
    >>> {key: (value.shape, str(value.dtype)) for key, value in batch.items()}
    {'x': ((2, 8), 'int32'), 'y': ((2, 8), 'int32')}
    >>> train.vocabulary.decode(batch["x"][0]), train.vocabulary.decode(batch["y"][0])
    ('to be or', 'o be or ')
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from divebatch_jax.data._checks import int_in_range
from divebatch_jax.data.sources import ArraySource, default_data_dir

SPLITS = ("train", "validation")


class ByteVocabulary(NamedTuple):
  """The byte values a text uses, ascending; token id ``k`` is byte ``symbols[k]``."""

  symbols: bytes

  @property
  def size(self) -> int:
    return len(self.symbols)

  def encode(self, text: bytes | str) -> np.ndarray:
    """Token ids (uint8) of ``text``; ValueError naming the first byte not in the vocabulary."""
    raw = np.frombuffer(text.encode() if isinstance(text, str) else bytes(text), np.uint8)
    table = np.full(256, -1, np.int16)
    table[np.frombuffer(self.symbols, np.uint8)] = np.arange(self.size)
    ids = table[raw]
    if ids.size and ids.min() < 0:
      bad = int(raw[np.argmin(ids)])
      raise ValueError(f"text holds the byte {bad} ({chr(bad)!r}), which is not in the vocabulary.")
    return ids.astype(np.uint8)

  def decode(self, ids) -> str:
    """The text of token ids (invalid UTF-8 shown as U+FFFD)."""
    table = np.frombuffer(self.symbols, np.uint8)
    return table[np.asarray(ids, np.int64)].tobytes().decode("utf-8", errors="replace")


def byte_vocabulary(text: bytes) -> ByteVocabulary:
  """The distinct bytes of ``text``, ascending."""
  return ByteVocabulary(bytes(np.unique(np.frombuffer(text, np.uint8)).tolist()))


class TextSource(ArraySource):
  """:class:`~divebatch_jax.data.ArraySource` of text windows, with their ``vocabulary`` and ``context``."""

  def __init__(self, windows: np.ndarray, *, vocabulary: ByteVocabulary):
    super().__init__({"x": windows[:, :-1], "y": windows[:, 1:]}, num_classes=vocabulary.size)
    self.vocabulary = vocabulary
    self.context = windows.shape[1] - 1

  @property
  def tokens_per_example(self) -> int:
    """Predicted tokens per window (T)."""
    return self.context


def _read_text(text: bytes | str | Path) -> bytes:
  if isinstance(text, bytes):
    return text
  path = Path(text)
  if not path.is_file():
    raise FileNotFoundError(f"text file {str(path)!r} does not exist.")
  return path.read_bytes()


def text_windows(
    text: bytes | str | Path,
    context: int,
    *,
    split: str = "train",
    validation_fraction: float = 0.1,
    stride: int | None = None,
) -> TextSource:
  """Windows of ``context`` tokens and their next tokens from a text (bytes or a file path).

  Args:
    text: the text's bytes, or the path of a file holding it.
    context: T >= 1, tokens per window.
    split: ``"train"`` (the first ``1 − validation_fraction`` of the text) or
      ``"validation"`` (the rest).
    validation_fraction: share of the text held out, in (0, 1).
    stride: tokens between window starts, >= 1 (default ``context``: no token
      predicted twice in an epoch).

  Raises ValueError naming the argument when the split is too short for one window.
  """
  raw = _read_text(text)
  context = int_in_range("context", context, 1)
  stride = context if stride is None else int_in_range("stride", stride, 1)
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  if not 0 < validation_fraction < 1:
    raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}.")
  if not raw:
    raise ValueError("text is empty: it must hold at least context + 1 bytes.")
  vocabulary = byte_vocabulary(raw)
  cut = int(len(raw) * (1 - validation_fraction))
  ids = vocabulary.encode(raw[:cut] if split == "train" else raw[cut:])
  count = (len(ids) - context - 1) // stride + 1 if len(ids) > context else 0
  if count < 1:
    raise ValueError(
        f"the {split} split holds {len(ids)} tokens, fewer than context + 1 = {context + 1}: "
        "pass a smaller context or a longer text."
    )
  starts = np.arange(count) * stride
  windows = ids[starts[:, None] + np.arange(context + 1)]
  return TextSource(windows, vocabulary=vocabulary)


def tinyshakespeare_path(data_dir: str | Path | None = None) -> Path:
  """``tinyshakespeare.txt`` in ``data_dir`` or its ``text/`` folder (default
  ``../shared/data/text``); FileNotFoundError naming where it looked."""
  root = Path(data_dir) if data_dir is not None else default_data_dir() / "text"
  candidates = [root / "tinyshakespeare.txt", root / "text" / "tinyshakespeare.txt"]
  path = next((p for p in candidates if p.is_file()), candidates[0])
  if not path.is_file():
    raise FileNotFoundError(
        f"tinyshakespeare was not found at {str(path)!r}: the project keeps it in "
        f"{default_data_dir() / 'text'} (../shared/data/text next to the repo); pass a data dir "
        "that holds text/tinyshakespeare.txt, or use text:PATH for any file."
    )
  return path
