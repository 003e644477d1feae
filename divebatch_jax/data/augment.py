"""Seeded CIFAR-style augmentation on the host: random crop after padding, random flip.

For each NHWC image: pad ``p`` zero pixels on every side, cut the ``H x W`` window
whose top-left corner is ``(dy, dx)`` with ``dy, dx`` uniform in ``{0, ..., 2p}``,
and mirror it left-right with probability 1/2 (torchvision's
``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``). It works on the stored
pixels (uint8 for CIFAR) before normalisation, so the padding is black.

Example::

    import numpy as np
    from divebatch_jax.data import CropFlip

    images = np.zeros((8, 32, 32, 3), np.uint8)
    batch = CropFlip(padding=4)({"x": images, "y": np.zeros(8, np.int32)},
                                rng=np.random.default_rng(0))
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from divebatch_jax.data._checks import int_in_range


def crop_and_flip(
    images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, *, padding: int
) -> np.ndarray:
  """Deterministic crop + flip: image ``i`` cut at ``offsets[i] = (dy, dx)``, mirrored if ``flips[i]``.

  Args:
    images: ``(B, H, W, C)`` array.
    offsets: ``(B, 2)`` ints in ``[0, 2·padding]``.
    flips: ``(B,)`` bools.
    padding: zero pixels added on each side before cropping, >= 0.
  """
  padding = int_in_range("padding", padding, 0)
  if images.ndim != 4:
    raise ValueError(f"images must be NHWC (4 dimensions), got shape {images.shape}.")
  b, h, w, _ = images.shape
  offsets = np.asarray(offsets)
  if offsets.shape != (b, 2) or offsets.min(initial=0) < 0 or offsets.max(initial=0) > 2 * padding:
    raise ValueError(f"offsets must be ({b}, 2) ints in [0, {2 * padding}], got shape {offsets.shape}.")
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out = np.empty_like(images)
  side = 2 * padding + 1
  keys = offsets[:, 0] * side + offsets[:, 1]
  for key in np.unique(keys):  # one slice copy per distinct offset: at most side² of them
    rows = np.flatnonzero(keys == key)
    dy, dx = divmod(int(key), side)
    out[rows] = padded[rows, dy : dy + h, dx : dx + w]
  flipped = np.flatnonzero(flips)
  out[flipped] = out[flipped, :, ::-1]
  return out


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, *, padding: int = 4) -> np.ndarray:
  """:func:`crop_and_flip` with offsets ``rng.integers(0, 2p+1, (B, 2))``, then flips ``rng.random(B) < 0.5``."""
  b = images.shape[0]
  offsets = rng.integers(0, 2 * padding + 1, size=(b, 2))
  flips = rng.random(b) < 0.5
  return crop_and_flip(images, offsets, flips, padding=padding)


class CropFlip(NamedTuple):
  """Batch augmentation for the pipeline: :func:`random_crop_flip` on ``batch["x"]``."""

  padding: int = 4

  def __call__(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {**batch, "x": random_crop_flip(batch["x"], rng, padding=self.padding)}
