"""A generated character corpus: text for a language model with no file to fetch.

:func:`generated_text` writes sentences from a small grammar (seeded, so the same
seed gives the same text). It is made by this code, holds no third-party text, and
carries the package's own licence. Notebooks and tests train on it where the
project's tinyshakespeare copy (``../shared/data/text``) is not at hand.

Example::

    >>> from divebatch_jax.data import corpus
    >>> text = corpus.generated_text(200, seed=0)
    >>> len(text), text == corpus.generated_text(200, seed=0)
    (200, True)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from divebatch_jax.data._checks import int_in_range

_SUBJECTS = ("the king", "a fool", "my lord", "the queen", "her brother", "this night", "the old man",
             "our good friend", "the soldier", "a gentle maid")
_VERBS = ("speaks of", "remembers", "would see", "cannot find", "loves", "fears", "calls for",
          "hath forgot", "shall answer", "keeps")
_OBJECTS = ("the crown", "his sword", "a quiet hour", "the sea", "that letter", "their honour",
            "the garden", "a little song", "the morning", "all the world")
_ENDINGS = (".", ".", ".", "!", "?", ";")


def generated_text(num_chars: int, *, seed: int = 0) -> str:
  """``num_chars`` characters of generated sentences (speaker lines and verse)."""
  num_chars = int_in_range("num_chars", num_chars, 1)
  rng = np.random.default_rng(int_in_range("seed", seed, 0))
  pick = lambda words: words[rng.integers(len(words))]
  lines, size = [], 0
  while size < num_chars:
    speaker = pick(_SUBJECTS).split()[-1].upper()
    sentence = f"{pick(_SUBJECTS)} {pick(_VERBS)} {pick(_OBJECTS)}{pick(_ENDINGS)}"
    line = f"{speaker}:\n{sentence[0].upper()}{sentence[1:]}\n\n"
    lines.append(line)
    size += len(line)
  return "".join(lines)[:num_chars]


def write_generated_text(path: str | Path, num_chars: int = 200_000, *, seed: int = 0) -> Path:
  """Writes :func:`generated_text` to ``path`` (UTF-8) and returns the path."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(generated_text(num_chars, seed=seed), encoding="utf-8")
  return path
