"""Crop + flip against a per-image NumPy loop; seeded draws; what the draws cover."""

import jax
import numpy as np
import pytest

from divebatch_jax.data import CropFlip, crop_and_flip


def _loop_crop_flip(images, offsets, flips, padding):
  out = []
  for image, (dy, dx), flip in zip(images, offsets, flips):
    padded = np.zeros((image.shape[0] + 2 * padding, image.shape[1] + 2 * padding, image.shape[2]), image.dtype)
    padded[padding : padding + image.shape[0], padding : padding + image.shape[1]] = image
    window = padded[dy : dy + image.shape[0], dx : dx + image.shape[1]]
    out.append(window[:, ::-1] if flip else window)
  return np.stack(out)


@pytest.mark.parametrize("padding", [0, 1, 4])
def test_crop_and_flip_matches_loop_exactly(padding):
  rng = np.random.default_rng(padding)
  images = rng.integers(0, 256, size=(16, 7, 5, 3)).astype(np.uint8)
  offsets = rng.integers(0, 2 * padding + 1, size=(16, 2))
  flips = rng.random(16) < 0.5
  out = jax.jit(crop_and_flip, static_argnames="padding")(images, offsets, flips, padding=padding)
  assert out.dtype == np.uint8
  assert np.array_equal(out, _loop_crop_flip(images, offsets, flips, padding))


def test_leading_axes_are_kept():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(2, 3, 6, 6, 1)).astype(np.uint8)  # (K, m, H, W, C)
  offsets = rng.integers(0, 5, size=(2, 3, 2))
  flips = rng.random((2, 3)) < 0.5
  out = crop_and_flip(images, offsets, flips, padding=2)
  flat = _loop_crop_flip(images.reshape(6, 6, 6, 1), offsets.reshape(6, 2), flips.reshape(6), 2)
  assert np.array_equal(out, flat.reshape(images.shape))


def test_centre_crop_without_flip_is_identity():
  images = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1)
  assert np.array_equal(crop_and_flip(images, np.full((2, 2), 4), np.zeros(2, bool), padding=4), images)
  mirrored = crop_and_flip(images, np.full((2, 2), 4), np.ones(2, bool), padding=4)
  assert np.array_equal(mirrored, images[:, :, ::-1])


def test_draw_uses_documented_sequence_and_seed():
  params = CropFlip(padding=4).draw(np.random.default_rng(7), 32)
  rng = np.random.default_rng(7)
  assert np.array_equal(params["offsets"], rng.integers(0, 9, size=(32, 2), dtype=np.int32))
  assert np.array_equal(params["flips"], rng.random(32) < 0.5)
  other = CropFlip(padding=4).draw(np.random.default_rng(8), 32)
  assert not np.array_equal(params["offsets"], other["offsets"])


def test_draws_cover_every_offset_and_flip_half_the_time():
  augment = CropFlip(padding=2)
  params = augment.draw(np.random.default_rng(0), 4000)
  images = np.ones((4000, 4, 4, 1), np.uint8)  # a black border shows where padding came in
  out = np.asarray(augment.apply({"x": images, "y": np.zeros(4000)}, params)["x"])
  # Each image keeps (4 - |dy - 2|) * (4 - |dx - 2|) of its 16 ones.
  kept = out.reshape(4000, -1).sum(axis=1)
  assert set(kept.tolist()) == {16, 12, 8, 9, 6, 4}
  assert np.mean(kept == 16) == pytest.approx(1 / 25, abs=0.015)  # dy = dx = 2
  assert set(np.unique(params["offsets"]).tolist()) == {0, 1, 2, 3, 4}
  assert np.mean(params["flips"]) == pytest.approx(0.5, abs=0.03)


def test_apply_changes_x_only():
  batch = {"x": np.zeros((3, 8, 8, 3), np.uint8), "y": np.arange(3, dtype=np.int32)}
  augment = CropFlip(padding=2)
  out = augment.apply(batch, augment.draw(np.random.default_rng(0), 3))
  assert out["y"] is batch["y"] and out["x"].shape == (3, 8, 8, 3)


def test_bad_arguments_are_named():
  images = np.zeros((2, 4, 4, 1), np.uint8)
  with pytest.raises(ValueError, match="padding"):
    crop_and_flip(images, np.zeros((2, 2), int), np.zeros(2, bool), padding=-1)
  with pytest.raises(ValueError, match=r"offsets must be ints in \[0, 2\]"):
    crop_and_flip(images, np.full((2, 2), 3), np.zeros(2, bool), padding=1)
  with pytest.raises(ValueError, match=r"offsets must have shape \(2, 2\)"):
    crop_and_flip(images, np.zeros((3, 2), int), np.zeros(2, bool), padding=1)
  with pytest.raises(ValueError, match="padding"):
    CropFlip(padding=-2).draw(np.random.default_rng(0), 4)
