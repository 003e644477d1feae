"""Seeded CIFAR-style augmentation: random crop after zero padding, random horizontal flip.

For each NHWC image: pad ``p`` zero pixels on every side, cut the ``H x W`` window
whose top-left corner is ``(dy, dx)`` with ``dy, dx`` uniform in ``{0, ..., 2p}``,
and mirror it left-right with probability 1/2 (torchvision's
``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``). It acts on the stored
pixels (uint8 for CIFAR) before normalisation, so the padding is black.

Split in two so the host does almost nothing per row: :meth:`CropFlip.draw` draws
the per-row offsets and flips from a seeded NumPy generator (in the pipeline's
background thread), and :meth:`CropFlip.apply` -- a pure, exact gather written
in jax -- runs on the device inside the pipeline's jitted preparation. (Cropping
on the host cost one NumPy call per distinct offset; in the worker threads those
calls contended for the GIL with the training loop's dispatch and capped the
pipeline at about a quarter of the rate it reaches without them.)

Example (offset ``(1, 1)`` is the identity; ``(2, 1)`` moves the image up one row)::

    >>> import numpy as np
    >>> from divebatch_jax.data import CropFlip
    >>> augment = CropFlip(padding=1)
    >>> params = augment.draw(np.random.default_rng(0), 8)
    >>> params["offsets"].shape, params["flips"].shape, int(params["offsets"].max()) <= 2
    ((8, 2), (8,), True)
    >>> batch = {"x": np.arange(1, 10, dtype=np.uint8).reshape(1, 3, 3, 1), "y": np.zeros(1, np.int32)}
    >>> up = {"offsets": np.array([[2, 1]], np.int32), "flips": np.array([False])}
    >>> augment.apply(batch, up)["x"][0, :, :, 0]
    Array([[4, 5, 6],
           [7, 8, 9],
           [0, 0, 0]], dtype=uint8)
    >>> mirrored = {"offsets": np.array([[1, 1]], np.int32), "flips": np.array([True])}
    >>> augment.apply(batch, mirrored)["x"][0, :, :, 0]
    Array([[3, 2, 1],
           [6, 5, 4],
           [9, 8, 7]], dtype=uint8)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from divebatch_jax.data._checks import int_in_range


def crop_and_flip(images: jax.Array, offsets: jax.Array, flips: jax.Array, *, padding: int) -> jax.Array:
  """Image ``i`` cut at ``offsets[i] = (dy, dx)`` of its zero-padded copy, mirrored if ``flips[i]``.

  Jittable; any leading axes (e.g. ``(K, m)``) before ``H, W, C``.

  Args:
    images: ``(..., H, W, C)`` array.
    offsets: ``(..., 2)`` ints in ``[0, 2·padding]`` (checked when concrete).
    flips: ``(...)`` bools.
    padding: zero pixels added on each side before cropping, >= 0.
  """
  padding = int_in_range("padding", padding, 0)
  images = jnp.asarray(images)
  if images.ndim < 3:
    raise ValueError(f"images must be (..., H, W, C), got shape {images.shape}.")
  lead, (h, w, c) = images.shape[:-3], images.shape[-3:]
  if jnp.shape(offsets) != lead + (2,) or jnp.shape(flips) != lead:
    raise ValueError(
        f"offsets must have shape {lead + (2,)} and flips {lead} to match images {images.shape}, "
        f"got {jnp.shape(offsets)} and {jnp.shape(flips)}."
    )
  if isinstance(offsets, np.ndarray) and (offsets.min(initial=0) < 0 or offsets.max(initial=0) > 2 * padding):
    raise ValueError(f"offsets must be ints in [0, {2 * padding}], got values in [{offsets.min()}, {offsets.max()}].")

  def one(image, offset, flip):
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    window = jax.lax.dynamic_slice(padded, (offset[0], offset[1], 0), (h, w, c))
    return jnp.where(flip, window[:, ::-1], window)

  for _ in lead:
    one = jax.vmap(one)
  return one(images, jnp.asarray(offsets, jnp.int32), jnp.asarray(flips, bool))


class CropFlip(NamedTuple):
  """The pipeline's augmentation: per-row draws on the host, :func:`crop_and_flip` on device."""

  padding: int = 4

  def draw(self, rng: np.random.Generator, num_rows: int) -> dict[str, np.ndarray]:
    """``{"offsets": rng.integers(0, 2p+1, (n, 2)), "flips": rng.random(n) < 0.5}``, in that order."""
    span = 2 * int_in_range("padding", self.padding, 0) + 1
    offsets = rng.integers(0, span, size=(num_rows, 2), dtype=np.int32)
    return {"offsets": offsets, "flips": rng.random(num_rows) < 0.5}

  def apply(self, batch: dict, params: dict) -> dict:
    """``batch`` with ``"x"`` cropped and flipped by ``params`` (jittable)."""
    x = crop_and_flip(batch["x"], params["offsets"], params["flips"], padding=self.padding)
    return {**batch, "x": x}
