"""Sources: in-memory arrays, digits, the synthetic teacher, TFDS (mock and real CIFAR-10)."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from divebatch_jax.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ArraySource,
    ArraySpec,
    ImagePreprocess,
    StreamingSource,
    cifar10,
    default_data_dir,
    digits,
    logistic_teacher,
    synthetic_logistic,
    tfds_source,
    to_model_batch,
)

SHARED_TFDS = default_data_dir() / "tfds"
needs_cifar = pytest.mark.skipif(
    not (SHARED_TFDS / "cifar10_jpeg").is_dir(),
    reason=f"real CIFAR-10 (TFDS cifar10_jpeg) not found in {SHARED_TFDS} (../shared/data/tfds)",
)


# ------------------------------------------------------------------ ArraySource


def test_array_source_gathers_in_index_order():
  x = np.arange(20, dtype=np.float32).reshape(10, 2)
  source = ArraySource({"x": x, "y": np.arange(10) % 3}, num_classes=3)
  batch = source.gather([7, 2, 2, 9])
  assert np.array_equal(batch["x"], x[[7, 2, 2, 9]])
  assert batch["y"].dtype == np.int32 and batch["y"].tolist() == [1, 2, 2, 0]
  assert source.num_examples == 10 and source.num_classes == 3
  assert source.element_spec == {"x": ArraySpec((2,), np.float32), "y": ArraySpec((), np.int32)}


def test_preprocess_gives_the_same_batch_on_device_under_jit():
  pixels = np.random.default_rng(1).integers(0, 256, size=(6, 4, 4, 3)).astype(np.uint8)
  stored = {"x": pixels, "y": np.arange(6, dtype=np.int64)}
  preprocess = ImagePreprocess(CIFAR10_MEAN, CIFAR10_STD)
  on_device = jax.jit(lambda rows: to_model_batch(rows, preprocess))(stored)
  on_host = to_model_batch(stored, preprocess)
  assert on_device["x"].dtype == np.float32 and on_device["y"].dtype == np.int32
  assert np.allclose(on_device["x"], on_host["x"], atol=1e-6) and np.array_equal(on_device["y"], on_host["y"])


def test_image_preprocess_formula():
  pixels = np.random.default_rng(0).integers(0, 256, size=(5, 3, 3, 3)).astype(np.uint8)
  out = ImagePreprocess(CIFAR10_MEAN, CIFAR10_STD)({"x": pixels, "y": np.zeros(5)})["x"]
  expected = (pixels.astype(np.float64) / 255 - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)
  assert np.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"x": np.zeros((3, 2))}, "missing"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(4)}, "leading axis"),
        ({"x": np.zeros((0, 2)), "y": np.zeros(0)}, "non-empty"),
    ],
)
def test_bad_arrays_are_named(arrays, match):
  with pytest.raises(ValueError, match=match):
    ArraySource(arrays, num_classes=2)


# ------------------------------------------------------------------ digits


def test_digits_is_a_fixed_partition_of_sklearn_digits():
  reference = load_digits()
  train, test = digits("train"), digits("test")
  assert train.num_examples + test.num_examples == 1797 and test.num_examples == 359
  assert train.num_classes == 10 and train.element_spec["x"] == ArraySpec((64,), np.float32)
  rows = np.concatenate([train.gather(range(train.num_examples))["x"], test.gather(range(test.num_examples))["x"]])
  labels = np.concatenate([train.gather(range(train.num_examples))["y"], test.gather(range(test.num_examples))["y"]])
  assert rows.min() == 0 and rows.max() == 1
  # The two splits together are exactly the data set (as multisets of (pixels, label) rows).
  key = lambda pixels, y: sorted(map(tuple, np.column_stack([pixels, y]).round().astype(int)))
  assert key(rows * 16, labels) == key(reference.data, reference.target)
  assert np.array_equal(digits("test").gather([0, 1])["x"], test.gather([0, 1])["x"])  # fixed
  assert not np.array_equal(digits("test", seed=1).gather(range(5))["x"], test.gather(range(5))["x"])
  assert digits("train", images=True).element_spec["x"] == ArraySpec((8, 8, 1), np.float32)


def test_digits_bad_split_is_named():
  with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
    digits("validation")


# ------------------------------------------------------------------ synthetic


def test_synthetic_logistic_defaults_and_teacher():
  train, test = synthetic_logistic()
  assert (train.num_examples, test.num_examples, train.num_classes) == (20_000, 4_000, 2)
  batch = train.gather(range(train.num_examples))
  x, y = batch["x"], batch["y"]
  assert x.shape == (20_000, 512) and x.dtype == np.float32
  assert x.min() >= -1 and x.max() <= 1
  assert abs(x.mean()) < 0.005 and x.var() == pytest.approx(1 / 3, rel=0.01)  # U(-1, 1)
  w_star = logistic_teacher(512, 0)
  assert w_star.mean() == pytest.approx(0, abs=0.15) and w_star.std() == pytest.approx(1, abs=0.1)
  margin = x.astype(np.float64) @ w_star
  disagree = (margin > 0) != (y == 1)
  assert np.all(np.abs(margin[disagree]) < 1e-4)  # noise = 0: labels are the teacher's, up to rounding


def test_synthetic_logistic_noise_flips_labels():
  train, test = synthetic_logistic(10_000, 16, noise=0.2, seed=3)
  batch = train.gather(range(10_000))
  flipped = (batch["x"].astype(np.float64) @ logistic_teacher(16, 3) > 0) != (batch["y"] == 1)
  assert flipped.mean() == pytest.approx(0.2, abs=0.015)  # binomial sd 0.004
  assert test.num_examples == 2_000
  other = synthetic_logistic(10_000, 16, noise=0.2, seed=4)[0].gather([0])["x"]
  assert not np.array_equal(other, batch["x"][:1])


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(noise=0.7), "noise"), (dict(num_examples=0), "num_examples"), (dict(dim=2.5), "dim")],
)
def test_synthetic_bad_arguments_are_named(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    synthetic_logistic(**kwargs)


# ------------------------------------------------------------------ TFDS on mock data


def test_tfds_source_on_mock_data_decodes_once_or_streams(tmp_path):
  with tfds.testing.mock_data(num_examples=40):
    raw = tfds.data_source("mnist", split="train", data_dir=str(tmp_path), download=False)
    in_memory = tfds_source("mnist", "train", tmp_path)
    streaming = tfds_source("mnist", "train", tmp_path, max_memory_bytes=0)
    assert isinstance(in_memory, ArraySource) and isinstance(streaming, StreamingSource)
    for source in (in_memory, streaming):
      assert source.num_examples == 40 and source.num_classes == 10
      assert source.element_spec == {"x": ArraySpec((28, 28, 1), np.float32), "y": ArraySpec((), np.int32)}
      batch = source.gather([5, 0, 39])
      for row, i in enumerate([5, 0, 39]):
        assert np.allclose(batch["x"][row], raw[i]["image"] / 255.0)
        assert batch["y"][row] == raw[i]["label"]


def test_tfds_missing_data_dir_names_it_and_the_shared_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist") as info:
    tfds_source("mnist", "train", tmp_path / "absent")
  assert str(tmp_path / "absent") in str(info.value) and "../shared/data" in str(info.value)


def test_tfds_missing_dataset_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="'no_such_dataset' was not found"):
    tfds_source("no_such_dataset", "train", tmp_path)


def test_tfds_registered_but_unprepared_never_downloads(tmp_path):
  with pytest.raises(FileNotFoundError, match="not prepared"):
    tfds_source("cifar10", "train", tmp_path)
  assert list(tmp_path.iterdir()) == []  # nothing fetched or created


def test_cifar10_missing_names_both_data_sets(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    cifar10("train", tmp_path)
  message = str(info.value)
  assert "'cifar10'" in message and "'cifar10_jpeg'" in message and "../shared/data" in message


# ------------------------------------------------------------------ real CIFAR-10


@needs_cifar
def test_cifar10_jpeg_real_images():
  source = cifar10("train[:2000]")
  assert isinstance(source, ArraySource) and source.num_examples == 2000 and source.num_classes == 10
  assert source.element_spec == {"x": ArraySpec((32, 32, 3), np.float32), "y": ArraySpec((), np.int32)}
  raw = tfds.data_source("cifar10_jpeg", split="train[:2000]", data_dir=str(SHARED_TFDS), download=False)
  pixels = np.stack([raw[i]["image"] for i in range(2000)]).astype(np.float64) / 255
  labels = np.array([raw[i]["label"] for i in range(2000)])
  batch = source.gather(range(2000))
  expected = (pixels - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)
  assert np.allclose(batch["x"], expected, atol=1e-5) and np.array_equal(batch["y"], labels)
  assert set(labels.tolist()) == set(range(10))
  # The constants are this data's per-channel statistics (JPEG shifts them slightly).
  assert np.allclose(pixels.mean(axis=(0, 1, 2)), CIFAR10_MEAN, atol=0.01)
  assert np.allclose(pixels.std(axis=(0, 1, 2)), CIFAR10_STD, atol=0.01)


@needs_cifar
def test_cifar10_streaming_equals_in_memory():
  in_memory = cifar10("test[:64]")
  streaming = cifar10("test[:64]", max_memory_bytes=0)
  assert isinstance(streaming, StreamingSource)
  indices = [63, 0, 17]
  assert np.array_equal(streaming.gather(indices)["x"], in_memory.gather(indices)["x"])


@needs_cifar
def test_cifar10_unknown_split_is_named():
  with pytest.raises(ValueError, match="split 'validation' is not available"):
    cifar10("validation")
