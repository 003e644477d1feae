"""Sources: in-memory arrays, npz files (validated), digits, the synthetic teacher, TFDS (mock and real CIFAR-10)."""

import pickle

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
from divebatch_jax.data.sources import npz_source

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


# ------------------------------------------------------------------ validation at load


@pytest.mark.parametrize(
    "arrays, num_classes, match",
    [
        ({"x": np.zeros((3, 2)), "y": np.array([0.0, 1.0, 1.0])}, 2, r"arrays\['y'\] must hold integer class labels, got dtype float64"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, 2, 1])}, 2, r"arrays\['y'\] holds the label 2, outside \[0, 2\)"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, -1, 1])}, 2, r"negative label -1; labels must be integers in \[0, 2\)"),
        ({"x": np.zeros((3, 2)), "y": np.zeros((3, 1, 2), int)}, 2, r"must be \(n,\) class labels or \(n, T\) per-token targets, got shape \(3, 1, 2\)"),
        ({"x": np.array([[0.0, np.nan], [np.inf, 1.0], [0, 0]]), "y": np.zeros(3, int)}, 2, r"arrays\['x'\] holds 2 NaN/inf value\(s\) of 6"),
        ({"x": np.array([["a"], ["b"], ["c"]]), "y": np.zeros(3, int)}, 2, r"arrays\['x'\] must be a numeric"),
    ],
)
def test_array_source_checks_labels_and_features(arrays, num_classes, match):
  with pytest.raises(ValueError, match=match):
    ArraySource(arrays, num_classes=num_classes)


def _save(path, **arrays):
  np.savez(path, **arrays)
  return path


def _valid_arrays(rng=None):
  rng = rng or np.random.default_rng(0)
  return dict(
      x_train=rng.normal(size=(20, 5)).astype(np.float32), y_train=rng.integers(0, 3, 20),
      x_test=rng.normal(size=(8, 5)).astype(np.float32), y_test=rng.integers(0, 3, 8),
  )


def test_npz_features_round_trip_with_stated_and_inferred_class_count(tmp_path):
  arrays = _valid_arrays()
  stated = npz_source(_save(tmp_path / "stated.npz", **arrays, num_classes=7))
  assert stated.train.num_classes == stated.test.num_classes == 7 and stated.notes == ()
  assert not stated.images and stated.train.preprocess is None
  batch = stated.train.gather(range(20))
  assert np.array_equal(batch["x"], arrays["x_train"]) and np.array_equal(batch["y"], arrays["y_train"])
  assert np.array_equal(stated.test.gather(range(8))["y"], arrays["y_test"])
  assert npz_source(tmp_path / "stated.npz", num_classes=7).train.num_classes == 7
  inferred = npz_source(_save(tmp_path / "inferred.npz", **arrays))
  expected = max(arrays["y_train"].max(), arrays["y_test"].max()) + 1
  assert inferred.train.num_classes == expected
  (note,) = inferred.notes
  assert f"num_classes inferred as {expected}" in note and "inferred.npz" in note


def test_npz_uint8_images_are_normalised_with_the_training_statistics(tmp_path):
  rng = np.random.default_rng(1)
  x_train = rng.integers(0, 256, size=(12, 4, 4, 3), dtype=np.uint8)
  x_test = rng.integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
  got = npz_source(_save(tmp_path / "img.npz", x_train=x_train, y_train=np.arange(12) % 4,
                         x_test=x_test, y_test=np.arange(5) % 4, num_classes=4))
  assert got.images
  pixels = x_train.astype(np.float64) / 255
  mean, std = pixels.mean(axis=(0, 1, 2)), pixels.std(axis=(0, 1, 2))
  expected = (x_test.astype(np.float64) / 255 - mean) / std
  assert np.allclose(got.test.gather(range(5))["x"], expected, atol=1e-5)


def _with(**changes):
  return lambda path: _save(path, **(_valid_arrays() | changes))


def _without(key):
  return lambda path: _save(path, **{k: v for k, v in _valid_arrays().items() if k != key})


def _bytes(content):
  def write(path):
    path.write_bytes(content(path))
    return path
  return write


def _valid_bytes(path, compressed=False):
  (np.savez_compressed if compressed else np.savez)(path, **_valid_arrays())
  return path.read_bytes()


def _flipped(compressed):
  def content(path):
    data = bytearray(_valid_bytes(path, compressed))
    data[300] ^= 0xFF  # inside x_train's data, the archive's first member
    return bytes(data)
  return content


def _single_npy(path):
  with open(path, "wb") as f:
    np.save(f, np.arange(3))
  return path


BAD_NPZ = {
    "missing key": (_without("y_test"), r"lacks the key\(s\) \['y_test'\]; keys found: \['x_train', 'y_train', 'x_test'\]"),
    "float labels": (_with(y_train=np.ones(20)), r"key 'y_train' must hold integer class labels, got dtype float64: float labels are refused"),
    "negative label": (_with(y_test=-np.ones(8, int)), r"key 'y_test' holds the negative label -1"),
    "label beyond num_classes": (_with(num_classes=np.int64(2), y_train=np.arange(20) % 3), r"key 'y_train' holds the label 2, outside \[0, 2\)"),
    "bad num_classes key": (_with(num_classes=np.float32(3)), r"key 'num_classes' must be one integer >= 1"),
    "lengths differ": (_with(y_train=np.zeros(19, int)), r"key 'y_train' has 19 labels for the 20 rows of x_train"),
    "NaN features": (_with(x_train=np.where(np.arange(100).reshape(20, 5) % 40 == 0, np.nan, 0.5)), r"key 'x_train' holds 3 NaN/inf value\(s\) of 100"),
    "inf features": (_with(x_test=np.full((8, 5), np.inf)), r"key 'x_test' holds 40 NaN/inf value\(s\)"),
    "string features": (_with(x_train=np.array([["a"] * 5] * 20)), r"key 'x_train' must be a numeric"),
    "no rows": (_with(x_test=np.zeros((0, 5)), y_test=np.zeros(0, int)), r"key 'x_test' has no rows"),
    "feature shapes differ": (_with(x_test=np.zeros((8, 4), np.float32)), r"x_train examples have shape \(5,\) but x_test examples have \(4,\)"),
    "storage differs": (_with(x_test=np.zeros((8, 5), np.uint8)), r"x_train is float32 but x_test is uint8"),
    "constant channel": (_with(x_train=np.zeros((20, 2, 2, 3), np.uint8), x_test=np.zeros((8, 2, 2, 3), np.uint8)), r"key 'x_train': channel\(s\) \[0, 1, 2\] are constant"),
    "object array": (_with(y_train=np.array([{"a": 1}] * 20, dtype=object)), r"key 'y_train' cannot be read \(ValueError\): it is damaged or holds Python objects"),
    "text file": (_bytes(lambda p: b"x_train,y_train\n1,2\n"), r"is not an \.npz archive .* or is damaged"),
    "empty file": (_bytes(lambda p: b""), r"is not an \.npz archive"),
    "pickle": (_bytes(lambda p: pickle.dumps({"x_train": [1]})), r"is not an \.npz archive"),
    "truncated archive": (_bytes(lambda p: _valid_bytes(p)[:300]), r"is not an \.npz archive .* damaged: BadZipFile"),
    "flipped byte": (_bytes(_flipped(compressed=False)), r"key 'x_train' cannot be read \(BadZipFile\): it is damaged"),
    "flipped byte, compressed": (_bytes(_flipped(compressed=True)), r"key 'x_train' cannot be read \(BadZipFile\): it is damaged"),
    "single .npy": (_single_npy, r"holds one \.npy array, not an \.npz archive"),
}


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_bad_npz_is_one_line_naming_the_file(tmp_path, case):
  make, match = BAD_NPZ[case]
  path = make(tmp_path / "bad.npz")
  with pytest.raises(ValueError, match=match) as info:
    npz_source(path)
  message = str(info.value)
  assert "\n" not in message and f"npz file '{path}'" in message
  assert "pickled" not in message and "allow_pickle" not in message


def test_npz_missing_file_and_conflicting_class_counts(tmp_path):
  with pytest.raises(FileNotFoundError, match="absent.npz' does not exist"):
    npz_source(tmp_path / "absent.npz")
  path = _save(tmp_path / "ten.npz", **_valid_arrays(), num_classes=10)
  with pytest.raises(ValueError, match=r"key 'num_classes' is 10 but num_classes=5 was passed"):
    npz_source(path, num_classes=5)
