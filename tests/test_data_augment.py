"""Crop + flip against a per-image loop; seeded randomness; what the draws cover."""

import numpy as np
import pytest

from divebatch_jax.data import CropFlip, crop_and_flip, random_crop_flip


def _loop_crop_flip(images, offsets, flips, padding):
  out = []
  for image, (dy, dx), flip in zip(images, offsets, flips):
    padded = np.zeros((image.shape[0] + 2 * padding, image.shape[1] + 2 * padding, image.shape[2]), image.dtype)
    padded[padding : padding + image.shape[0], padding : padding + image.shape[1]] = image
    window = padded[dy : dy + image.shape[0], dx : dx + image.shape[1]]
    out.append(window[:, ::-1] if flip else window)
  return np.stack(out)


@pytest.mark.parametrize("padding", [0, 1, 4])
def test_crop_and_flip_matches_loop(padding):
  rng = np.random.default_rng(padding)
  images = rng.integers(0, 256, size=(16, 7, 5, 3)).astype(np.uint8)
  offsets = rng.integers(0, 2 * padding + 1, size=(16, 2))
  flips = rng.random(16) < 0.5
  out = crop_and_flip(images, offsets, flips, padding=padding)
  assert out.dtype == np.uint8
  assert np.array_equal(out, _loop_crop_flip(images, offsets, flips, padding))


def test_centre_crop_without_flip_is_identity():
  images = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1)
  same = crop_and_flip(images, np.full((2, 2), 4), np.zeros(2, bool), padding=4)
  assert np.array_equal(same, images)
  mirrored = crop_and_flip(images, np.full((2, 2), 4), np.ones(2, bool), padding=4)
  assert np.array_equal(mirrored, images[:, :, ::-1])


def test_random_crop_flip_uses_documented_draws():
  images = np.random.default_rng(0).integers(0, 256, size=(32, 8, 8, 3)).astype(np.uint8)
  out = random_crop_flip(images, np.random.default_rng(7), padding=4)
  rng = np.random.default_rng(7)
  offsets = rng.integers(0, 9, size=(32, 2))
  flips = rng.random(32) < 0.5
  assert np.array_equal(out, _loop_crop_flip(images, offsets, flips, 4))
  assert np.array_equal(out, random_crop_flip(images, np.random.default_rng(7), padding=4))
  assert not np.array_equal(out, random_crop_flip(images, np.random.default_rng(8), padding=4))


def test_draws_cover_every_offset_and_flip_half_the_time():
  rng = np.random.default_rng(0)
  images = np.ones((4000, 4, 4, 1), np.uint8)  # a black border shows where padding came in
  out = random_crop_flip(images, rng, padding=2)
  # Each image keeps (4 - |dy - 2|) * (4 - |dx - 2|) of its 16 ones.
  kept = out.reshape(4000, -1).sum(axis=1)
  assert set(kept.tolist()) == {16, 12, 8, 9, 6, 4}
  assert np.mean(kept == 16) == pytest.approx(1 / 25, abs=0.015)  # dy = dx = 2
  flips = random_crop_flip(np.arange(4, dtype=np.uint8).reshape(1, 1, 4, 1).repeat(4000, 0), rng, padding=0)
  assert np.mean(flips[:, 0, 0, 0] == 3) == pytest.approx(0.5, abs=0.03)


def test_crop_flip_augments_x_only():
  batch = {"x": np.zeros((3, 8, 8, 3), np.uint8), "y": np.arange(3, dtype=np.int32)}
  out = CropFlip(padding=2)(batch, rng=np.random.default_rng(0))
  assert out["y"] is batch["y"] and out["x"].shape == (3, 8, 8, 3)


def test_bad_arguments_are_named():
  images = np.zeros((2, 4, 4, 1), np.uint8)
  with pytest.raises(ValueError, match="padding"):
    crop_and_flip(images, np.zeros((2, 2), int), np.zeros(2, bool), padding=-1)
  with pytest.raises(ValueError, match=r"offsets must be \(2, 2\) ints in \[0, 2\]"):
    crop_and_flip(images, np.full((2, 2), 3), np.zeros(2, bool), padding=1)
  with pytest.raises(ValueError, match="NHWC"):
    crop_and_flip(np.zeros((2, 4, 4), np.uint8), np.zeros((2, 2), int), np.zeros(2, bool), padding=1)
