"""Random-access data sources: what the sampler's indices are gathered from.

Every source has ``num_examples``, ``num_classes``, ``element_spec`` (shape and
dtype of one example of each batch entry) and ``gather(indices)``, which returns
a model batch ``{"x": float32 (B, ...), "y": int32 (B,)}`` in the order of
``indices`` (integer inputs, e.g. token ids, stay integer: int32; per-token targets
are ``(B, T)``). Sources store examples compactly (CIFAR as uint8 pixels) and
convert per batch:

    gather(indices) = to_model_batch(read(indices), preprocess)

``read`` returns the stored rows and ``preprocess`` (e.g. :class:`ImagePreprocess`)
is written with array methods that work on NumPy and jax arrays alike, so the
:class:`~divebatch_jax.data.pipeline.Pipeline` pads the compact rows on the host
and converts them on the device (4x fewer bytes to transfer).

* :class:`ArraySource` -- an in-memory dict of NumPy arrays;
* :class:`StreamingSource` -- any random-access sequence of example dicts (a TFDS
  data source), decoded per batch when the split is too big for memory;
* :func:`tfds_source` -- ``tfds.data_source(name, split=..., data_dir=...)``,
  decoded once into an :class:`ArraySource` when it fits in
  ``max_memory_bytes``, streamed otherwise;
* :func:`cifar10` -- TFDS ``cifar10`` if prepared in ``data_dir``, else
  ``cifar10_jpeg`` (the copy in ``../shared/data/tfds``), normalised per channel;
* :func:`npz_source` -- your own arrays from one ``.npz`` file, validated at load;
* :func:`digits` -- scikit-learn's bundled 8x8 digits, a fixed seeded split;
* :func:`synthetic_logistic` -- features U(-1, 1), a teacher ``w* ~ N(0, I)``,
  labels ``1[x·w* > 0]`` flipped with probability ``noise``.

Example::

    >>> from divebatch_jax.data import digits
    >>> train = digits("train")
    >>> train.num_examples, train.num_classes, train.element_spec["x"]
    (1438, 10, ArraySpec(shape=(64,), dtype=dtype('float32')))
    >>> batch = train.gather([0, 5, 7])
    >>> {key: (value.shape, str(value.dtype)) for key, value in batch.items()}
    {'x': ((3, 64), 'float32'), 'y': ((3,), 'int32')}
    >>> 0.0 <= float(batch["x"].min()) <= float(batch["x"].max()) <= 1.0
    True
"""

from __future__ import annotations

import os
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from divebatch_jax._optional import require
from divebatch_jax.data._checks import check_features, check_labels, int_in_range

Batch = dict[str, np.ndarray]

# Per-channel mean and standard deviation of the CIFAR-10 training images in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
DEFAULT_MAX_MEMORY_BYTES = 4 * 2**30
_DECODE_CHUNK = 1024
# Largest class count npz_source accepts: a label of 10**9 would ask for a ~1 TB output layer.
MAX_NUM_CLASSES = 2**20


DATA_DIR_ENV = "DIVEBATCH_DATA_DIR"  # a folder of prepared TFDS data sets, when data_dir is not given


def default_data_dir() -> Path:
  """``<repo>/../shared/data``: where the project keeps its offline data beside a source checkout."""
  return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def default_tfds_dir() -> Path | None:
  """The TFDS folder used when ``data_dir`` is not given, or None where there is none.

  ``$DIVEBATCH_DATA_DIR`` when set, else ``../shared/data/tfds`` beside a source
  checkout (the folder holding ``pyproject.toml`` above this package); an installed
  wheel has no checkout, so without the variable it has no default::

      >>> import os
      >>> from unittest import mock
      >>> with mock.patch.dict(os.environ, {"DIVEBATCH_DATA_DIR": "/data/tfds"}):
      ...   default_tfds_dir().as_posix()
      '/data/tfds'
  """
  if os.environ.get(DATA_DIR_ENV):
    return Path(os.environ[DATA_DIR_ENV])
  checkout = Path(__file__).resolve().parents[2]
  return default_data_dir() / "tfds" if (checkout / "pyproject.toml").is_file() else None


class ArraySpec(NamedTuple):
  """Shape and dtype of one example of a batch entry (no batch axis)."""

  shape: tuple[int, ...]
  dtype: np.dtype


class ImagePreprocess(NamedTuple):
  """Stored uint8 pixels to model input: ``x / 255``, then ``(x − mean) / std`` per channel.

  Works on NumPy and jax arrays (the pipeline applies it on the device).
  """

  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None

  def __call__(self, batch: Batch) -> Batch:
    x = batch["x"].astype(np.float32) / np.float32(255)
    if self.mean is not None:
      x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
    return {**batch, "x": x}


class FloatFeatures(NamedTuple):
  """Stored numeric features to float32 model input (integer counts, bools); no scaling."""

  def __call__(self, batch: Batch) -> Batch:
    return {**batch, "x": batch["x"].astype(np.float32)}


def to_model_batch(stored: Batch, preprocess: Callable[[Batch], Batch] | None) -> Batch:
  """``{"x": float32 or int32, "y": int32}`` from stored rows (NumPy or jax arrays; jittable).

  ``x`` that is integer after ``preprocess`` (token ids) stays integer, as int32;
  anything else becomes float32.
  """
  if preprocess is not None:
    stored = preprocess(stored)
  x = stored["x"]
  x_dtype = np.int32 if np.issubdtype(x.dtype, np.integer) else np.float32
  return {"x": x.astype(x_dtype), "y": stored["y"].astype(np.int32)}


def _spec_of(batch: Batch) -> dict[str, ArraySpec]:
  return {name: ArraySpec(tuple(v.shape[1:]), v.dtype) for name, v in batch.items()}


def _check_num_classes(num_classes: Any) -> int:
  return int_in_range("num_classes", num_classes, 1)


class ArraySource:
  """Examples held in memory as ``{"x": (n, ...), "y": (n,)}`` NumPy arrays.

  Args:
    arrays: mapping with at least ``"x"`` and ``"y"``, leading axes equal (n >= 1);
      ``x`` numeric and finite, ``y`` integer labels in ``[0, num_classes)``: ``(n,)``
      class labels or ``(n, T)`` per-token targets (:func:`~divebatch_jax.data.text_windows`).
    num_classes: number of label classes.
    preprocess: stored rows -> model rows (e.g. :class:`ImagePreprocess`); None
      when ``x`` is stored as features already.
  """

  def __init__(
      self,
      arrays: Mapping[str, np.ndarray],
      *,
      num_classes: int,
      preprocess: Callable[[Batch], Batch] | None = None,
  ):
    missing = {"x", "y"} - set(arrays)
    if missing:
      raise ValueError(f"arrays must have entries 'x' and 'y'; missing {sorted(missing)}.")
    self.arrays = {"x": np.asarray(arrays["x"]), "y": np.asarray(arrays["y"])}
    sizes = {v.shape[0] if v.ndim else 0 for v in self.arrays.values()}
    if len(sizes) != 1 or 0 in sizes:
      raise ValueError(f"arrays 'x' and 'y' must share a non-empty leading axis, got sizes {sorted(sizes)}.")
    self.num_examples = sizes.pop()
    self.num_classes = _check_num_classes(num_classes)
    check_features("arrays['x']", self.arrays["x"])
    check_labels("arrays['y']", self.arrays["y"], self.num_classes, per_token=True)
    self.preprocess = preprocess
    self.element_spec = _spec_of(self.gather([0]))

  def read(self, indices: Sequence[int]) -> Batch:
    """The stored (unprocessed) rows ``indices``."""
    indices = np.asarray(indices, np.int64)
    return {k: v[indices] for k, v in self.arrays.items()}

  def gather(self, indices: Sequence[int]) -> Batch:
    """The model batch of rows ``indices``."""
    return to_model_batch(self.read(indices), self.preprocess)


class StreamingSource:
  """Examples decoded per batch from a random-access sequence of example dicts.

  Args:
    data_source: ``len()`` and ``data_source[i] -> {x_key: ..., y_key: ...}``
      (e.g. a TFDS ArrayRecord data source).
    x_key, y_key: the input and label entries of an example.
    num_classes, preprocess: as for :class:`ArraySource`.
  """

  def __init__(
      self,
      data_source: Sequence[Mapping[str, Any]],
      *,
      x_key: str,
      y_key: str,
      num_classes: int,
      preprocess: Callable[[Batch], Batch] | None = None,
  ):
    self.data_source = data_source
    self.x_key, self.y_key = x_key, y_key
    self.num_examples = int_in_range("len(data_source)", len(data_source), 1)
    self.num_classes = _check_num_classes(num_classes)
    self.preprocess = preprocess
    self.element_spec = _spec_of(self.gather([0]))

  def read(self, indices: Sequence[int]) -> Batch:
    """The stored (decoded, unprocessed) rows ``indices``."""
    examples = [self.data_source[int(i)] for i in indices]
    missing = {self.x_key, self.y_key} - set(examples[0]) if examples else set()
    if missing:
      raise KeyError(
          f"examples have no entries {sorted(missing)}; available: {sorted(examples[0])}. "
          "Pass x_key= and y_key=."
      )
    return {
        "x": np.stack([np.asarray(e[self.x_key]) for e in examples]),
        "y": np.asarray([e[self.y_key] for e in examples], np.int32),
    }

  def gather(self, indices: Sequence[int]) -> Batch:
    """The model batch of rows ``indices``."""
    return to_model_batch(self.read(indices), self.preprocess)

  def to_memory(self) -> ArraySource:
    """Decodes every example once into an :class:`ArraySource`."""
    first = self.read([0])
    arrays = {k: np.empty((self.num_examples,) + v.shape[1:], v.dtype) for k, v in first.items()}
    for start in range(0, self.num_examples, _DECODE_CHUNK):
      stop = min(start + _DECODE_CHUNK, self.num_examples)
      for k, v in self.read(range(start, stop)).items():
        arrays[k][start:stop] = v
    return ArraySource(arrays, num_classes=self.num_classes, preprocess=self.preprocess)

  def stored_bytes(self) -> int:
    """Memory an :meth:`to_memory` copy takes, from the first example's size."""
    return self.num_examples * sum(v.nbytes for v in self.read([0]).values())


def _check_data_dir(data_dir: str | Path | None, what: str) -> Path:
  """``data_dir``, else :func:`default_tfds_dir`; FileNotFoundError saying what to pass."""
  data_dir = Path(data_dir) if data_dir is not None else default_tfds_dir()
  if data_dir is None:
    raise FileNotFoundError(
        f"no data directory for {what}: pass --data-dir DIR (data_dir= in Python) or set "
        f"${DATA_DIR_ENV} to a folder of prepared TFDS data sets."
    )
  if not data_dir.is_dir():
    raise FileNotFoundError(
        f"data_dir {str(data_dir)!r} for {what} does not exist: pass --data-dir DIR (data_dir= "
        f"in Python) or set ${DATA_DIR_ENV} to a folder of prepared TFDS data sets (beside a "
        "source checkout: ../shared/data/tfds)."
    )
  return data_dir


def open_tfds(name: str, split: str, data_dir: str | Path | None = None):
  """``tfds.data_source(name, split=split, data_dir=data_dir)``, offline, with clear errors.

  Never downloads or prepares (``download=False``, ``try_gcs=False``). Raises
  FileNotFoundError when ``data_dir`` or the data set is missing and ValueError for
  an unknown ``split``.
  """
  tfds = require("tensorflow_datasets", needed_by=f"TFDS data set {name!r}")
  data_dir = _check_data_dir(data_dir, f"TFDS data set {name!r}")
  try:
    return tfds.data_source(name, split=split, data_dir=str(data_dir), download=False, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise FileNotFoundError(
        f"TFDS data set {name!r} was not found in data_dir {str(data_dir)!r}: expected "
        f"{data_dir / name}/<version>/dataset_info.json. Check the name, or point data_dir "
        "at the folder that holds it."
    ) from None
  except (NotImplementedError, AssertionError) as error:
    raise FileNotFoundError(
        f"TFDS data set {name!r} is known but not prepared for random access in data_dir "
        f"{str(data_dir)!r}. Prepare it where the network is available with "
        f"`tfds build {name} --data_dir=... --file_format=array_record`, or use a data_dir "
        "that holds it."
    ) from error
  except ValueError as error:
    raise ValueError(
        f"split {split!r} is not available for TFDS data set {name!r} in {str(data_dir)!r} "
        f"(TFDS said: {str(error).splitlines()[0]}). Use e.g. split='train' or 'test'."
    ) from error


def tfds_source(
    name: str,
    split: str,
    data_dir: str | Path | None = None,
    *,
    x_key: str = "image",
    y_key: str = "label",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
) -> ArraySource | StreamingSource:
  """A TFDS random-access split as a source: decoded once into memory when it fits.

  Args:
    name: TFDS data set name, e.g. ``"cifar10_jpeg"``.
    split: TFDS split, slices allowed (``"train[:1000]"``).
    data_dir: folder of prepared TFDS data sets (default ``../shared/data/tfds``).
    x_key, y_key: the example entries used as ``"x"`` and ``"y"``.
    mean, std: per-channel normalisation of uint8 images after ``/ 255``.
    max_memory_bytes: decode the whole split into an :class:`ArraySource` when its
      stored size is at most this; stream per batch otherwise.
  """
  if (mean is None) != (std is None):
    raise ValueError("mean and std must be given together (or both left None).")
  data_source = open_tfds(name, split, data_dir)
  label = data_source.dataset_info.features[y_key]
  if not hasattr(label, "num_classes"):
    raise ValueError(f"y_key={y_key!r} of {name!r} is not a ClassLabel feature; pass another y_key.")
  x_feature = data_source.dataset_info.features[x_key]
  preprocess = None
  if np.dtype(x_feature.np_dtype) == np.uint8:
    preprocess = ImagePreprocess(
        None if mean is None else tuple(mean), None if std is None else tuple(std)
    )
  elif mean is not None:
    raise ValueError(f"mean/std apply to uint8 images; x_key={x_key!r} of {name!r} is {x_feature.np_dtype}.")
  source = StreamingSource(
      data_source, x_key=x_key, y_key=y_key, num_classes=label.num_classes, preprocess=preprocess
  )
  max_memory_bytes = int_in_range("max_memory_bytes", max_memory_bytes, 0)
  return source.to_memory() if source.stored_bytes() <= max_memory_bytes else source


def _tfds_is_prepared(name: str, data_dir: Path) -> bool:
  tfds = require("tensorflow_datasets", needed_by=f"TFDS data set {name!r}")

  try:
    return tfds.builder(name, data_dir=str(data_dir), try_gcs=False).is_prepared()
  except tfds.core.registered.DatasetNotFoundError:
    return False


def cifar10(
    split: str = "train",
    data_dir: str | Path | None = None,
    *,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
) -> ArraySource | StreamingSource:
  """CIFAR-10 images ``(32, 32, 3)`` float32, normalised by :data:`CIFAR10_MEAN`/:data:`CIFAR10_STD`.

  Uses TFDS ``cifar10`` when it is prepared in ``data_dir``, else ``cifar10_jpeg``
  (the offline copy in ``../shared/data/tfds``). The training split (50,000
  images, 150 MB as uint8) is decoded once into memory.
  """
  data_dir = _check_data_dir(data_dir, "CIFAR-10")
  for name in ("cifar10", "cifar10_jpeg"):
    if _tfds_is_prepared(name, data_dir):
      return tfds_source(
          name, split, data_dir, mean=CIFAR10_MEAN, std=CIFAR10_STD, max_memory_bytes=max_memory_bytes
      )
  raise FileNotFoundError(
      f"CIFAR-10 was not found in data_dir {str(data_dir)!r}: looked for a prepared TFDS "
      f"'cifar10' ({str(data_dir / 'cifar10')}) and 'cifar10_jpeg' "
      f"({str(data_dir / 'cifar10_jpeg')}). Pass --data-dir DIR (data_dir= in Python) or set "
      f"${DATA_DIR_ENV} to the folder holding one (beside a source checkout: ../shared/data/tfds)."
  )


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# What a damaged .npz raises while numpy reads it: zip and zlib errors, truncated
# or garbled .npy headers (parsed with tokenize/ast), short data.
_NPZ_READ_ERRORS = (ValueError, EOFError, zipfile.BadZipFile, zlib.error, tokenize.TokenError, SyntaxError)


class NpzSplits(NamedTuple):
  """:func:`npz_source`'s result: both splits, whether ``x`` are uint8 images, and notes to print."""

  train: ArraySource
  test: ArraySource
  images: bool
  notes: tuple[str, ...]


def _read_npz(path: Path) -> dict[str, np.ndarray]:
  """The arrays of ``path`` (pickles refused); one-line ValueError for anything unreadable."""
  what = f"npz file {str(path)!r}"
  try:
    loaded = np.load(path, allow_pickle=False)
  except _NPZ_READ_ERRORS as err:
    raise ValueError(
        f"{what} is not an .npz archive (a zip of .npy arrays, as np.savez writes) or is "
        f"damaged: {type(err).__name__}."
    ) from None
  if not isinstance(loaded, np.lib.npyio.NpzFile):
    raise ValueError(f"{what} holds one .npy array, not an .npz archive with keys {list(NPZ_KEYS)}.")
  with loaded:
    found = list(loaded.files)
    missing = [key for key in NPZ_KEYS if key not in found]
    if missing:
      raise ValueError(
          f"{what} lacks the key(s) {missing}; keys found: {found}. Save it with "
          "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)."
      )
    arrays = {}
    for key in [k for k in found if k in NPZ_KEYS or k == "num_classes"]:
      _check_npy_size(loaded.zip, key, path, f"{what}, key {key!r}")  # before numpy allocates
      try:
        arrays[key] = loaded[key]
      except _NPZ_READ_ERRORS as err:
        raise ValueError(
            f"{what}, key {key!r} cannot be read ({type(err).__name__}): it is damaged or holds "
            "Python objects (object arrays need pickle, which is refused)."
        ) from None
  return arrays


# Deflate cannot shrink data by more than about 1032:1: an entry claiming more is forged.
_DEFLATE_RATIO = 1032


def _memory_bytes() -> int:
  """This machine's physical memory: no array of an npz file may claim more."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return 1 << 40


def _check_npy_size(archive: zipfile.ZipFile, key: str, path: Path, what: str) -> None:
  """The shape in ``key``'s .npy header, checked against the bytes the entry holds, the
  file's size and the machine's memory before numpy allocates the array (a forged
  header of 1.5 kB may claim terabytes)."""
  info = archive.getinfo(f"{key}.npy")
  claimed = info.file_size
  stored = info.compress_size
  if claimed > max(stored, 1) * (1 if info.compress_type == zipfile.ZIP_STORED else _DEFLATE_RATIO) or stored > path.stat().st_size:
    raise ValueError(f"{what}: the archive claims {claimed:,} bytes from {stored:,} stored; it is damaged or forged.")
  try:
    with archive.open(info) as f:
      version = np.lib.format.read_magic(f)
      read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      shape, _, dtype = read_header(f)
      header = f.tell()
  except _NPZ_READ_ERRORS:
    return  # numpy's own read fails the same way, before allocating, and _read_npz names it
  if dtype.hasobject:
    return  # refused by numpy without pickle, allocating nothing
  needed = int(np.prod(shape, dtype=object)) * dtype.itemsize
  if needed > claimed - header or needed > _memory_bytes():
    raise ValueError(
        f"{what}: its header claims shape {tuple(shape)} of {dtype} ({needed:,} bytes), but the entry "
        f"holds {claimed - header:,} bytes of data and this machine has {_memory_bytes():,}; it is damaged or forged.")


def npz_source(path: str | Path, *, num_classes: int | None = None) -> NpzSplits:
  """Train and test sources from one ``.npz`` file, every array checked before any training.

  The file holds ``x_train``, ``y_train``, ``x_test``, ``y_test`` and optionally a
  scalar ``num_classes``. Checked, each failure a one-line ValueError naming the
  file and the key: a readable archive (``allow_pickle=False``: no code runs);
  the four keys (the keys found are listed); at least one row per split and as
  many labels as rows; numeric, finite features with the same per-example shape
  and storage in both splits; integer labels (floats refused, not truncated) in
  ``[0, num_classes)``. The class count is the argument, else the file's
  ``num_classes`` key (they must agree), else inferred as the largest label + 1
  (and said so in ``notes``).

  uint8 ``(n, H, W, C)`` images are scaled to [0, 1] and normalised per channel
  with the training images' mean and std (``images`` True); other features are
  used as given, as float32 (:class:`FloatFeatures`).

  Example::

      >>> import os, tempfile
      >>> import numpy as np
      >>> path = os.path.join(tempfile.mkdtemp(), "mine.npz")
      >>> x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
      >>> np.savez(path, x_train=x, y_train=np.arange(20) % 3, x_test=x[:5], y_test=np.arange(5) % 3,
      ...          num_classes=3)
      >>> train, test, images, notes = npz_source(path)
      >>> train.num_examples, test.num_examples, train.num_classes, images, notes
      (20, 5, 3, False, ())
      >>> train.gather([4])["y"]
      array([1], dtype=int32)
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"npz file {str(path)!r} does not exist.")
  arrays = _read_npz(path)
  name = lambda key: f"npz file {str(path)!r}, key {key!r}"
  stated = _stated_num_classes(arrays, num_classes, name)
  for split in ("train", "test"):
    _check_npz_split(arrays, split, stated, name)
  _check_splits_match(arrays, path)
  notes = []
  if stated is None:
    stated, note = _inferred_num_classes(arrays, path, name)
    notes.append(note)
  x_train = arrays["x_train"]
  images = x_train.dtype == np.uint8 and x_train.ndim == 4
  preprocess = _image_preprocess(x_train, name) if images else (None if x_train.dtype.kind == "f" else FloatFeatures())
  make = lambda split: ArraySource(
      {"x": arrays[f"x_{split}"], "y": arrays[f"y_{split}"].astype(np.int32)},
      num_classes=stated,
      preprocess=preprocess,
  )
  return NpzSplits(make("train"), make("test"), bool(images), tuple(notes))


def _stated_num_classes(arrays, num_classes: int | None, name) -> int | None:
  """The class count the argument or the file's ``num_classes`` key states (they must agree)."""
  stored = None
  if "num_classes" in arrays:
    value = arrays["num_classes"]
    if value.ndim != 0 or not np.issubdtype(value.dtype, np.integer) or value < 1:
      raise ValueError(f"{name('num_classes')} must be one integer >= 1, got {value!r}.")
    stored = int(value)
    if stored > MAX_NUM_CLASSES:
      raise ValueError(f"{name('num_classes')} is {stored:,}; at most {MAX_NUM_CLASSES:,} classes are supported.")
  if num_classes is not None:
    num_classes = _check_num_classes(num_classes)
    if stored is not None and stored != num_classes:
      raise ValueError(f"{name('num_classes')} is {stored} but num_classes={num_classes} was passed.")
  return num_classes if num_classes is not None else stored


def _check_npz_split(arrays, split: str, stated: int | None, name) -> None:
  """Rows, features (finite, a feature axis) and labels of one split."""
  x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
  rows = x.shape[0] if x.ndim else 0
  if rows == 0:
    raise ValueError(f"{name(f'x_{split}')} has no rows (shape {x.shape}); each split needs at least one example.")
  check_features(name(f"x_{split}"), x)
  _check_finite_in_float32(name(f"x_{split}"), x)
  if x.ndim < 2:
    raise ValueError(
        f"{name(f'x_{split}')} has shape {x.shape}: each example needs a feature axis, (rows, "
        "features) or (rows, H, W, C); store one feature per row as x[:, None]."
    )
  check_labels(name(f"y_{split}"), y, stated)
  if y.shape[0] != rows:
    raise ValueError(f"{name(f'y_{split}')} has {y.shape[0]} labels for the {rows} rows of x_{split}.")


def _check_finite_in_float32(name: str, x: np.ndarray) -> None:
  """Wider floats must stay finite in the float32 the model trains in (1e300 becomes inf)."""
  if x.dtype.kind != "f" or x.dtype.itemsize <= 4:
    return
  with np.errstate(over="ignore"):
    bad = int(np.count_nonzero(np.isinf(x.astype(np.float32))))  # x itself is finite (check_features)
  if bad:
    raise ValueError(
        f"{name} holds {bad} value(s) beyond float32's range (|x| > {float(np.finfo(np.float32).max):.4g}), "
        "which become inf in the float32 the model trains in; rescale the features.")


def _check_splits_match(arrays, path: Path) -> None:
  x_train, x_test = arrays["x_train"], arrays["x_test"]
  if x_train.shape[1:] != x_test.shape[1:]:
    raise ValueError(
        f"npz file {str(path)!r}: x_train examples have shape {x_train.shape[1:]} but x_test "
        f"examples have {x_test.shape[1:]}; both splits must match."
    )
  if (x_train.dtype == np.uint8) != (x_test.dtype == np.uint8):
    raise ValueError(
        f"npz file {str(path)!r}: x_train is {x_train.dtype} but x_test is {x_test.dtype}; store "
        "both as uint8 images or both as features (uint8 images are scaled by 1/255)."
    )


def _inferred_num_classes(arrays, path: Path, name) -> tuple[int, str]:
  """The largest label + 1 (capped) and the note that says so."""
  key = max(("y_train", "y_test"), key=lambda k: arrays[k].max())
  inferred = int(arrays[key].max()) + 1
  if inferred > MAX_NUM_CLASSES:
    raise ValueError(
        f"{name(key)} holds the label {inferred - 1}, which makes {inferred} classes; at most "
        f"{MAX_NUM_CLASSES:,} are supported (the output layer has one row per class): number "
        "the classes 0 .. C-1."
    )
  return inferred, (
      f"npz file {str(path)!r}: num_classes inferred as {inferred} (the largest label + 1); "
      "store a 'num_classes' key to state it."
  )


def _image_preprocess(x_train, name) -> "ImagePreprocess":
  """Per-channel normalisation with the training images' mean and std."""
  pixels = x_train.reshape(-1, x_train.shape[-1]).astype(np.float64) / 255
  mean, std = pixels.mean(0), pixels.std(0)
  if not np.all(std > 0):
    raise ValueError(
        f"{name('x_train')}: channel(s) {np.flatnonzero(std == 0).tolist()} are constant, so "
        "per-channel normalisation would divide by zero."
    )
  return ImagePreprocess(tuple(mean), tuple(std))


def digits(split: str = "train", *, test_fraction: float = 0.2, seed: int = 0, images: bool = False) -> ArraySource:
  """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), pixels scaled to [0, 1].

  The split is fixed by ``seed``: a permutation of the 1,797 examples, the first
  ``round(test_fraction · 1797)`` are ``"test"``, the rest ``"train"``. ``x`` is
  ``(64,)`` features, or ``(8, 8, 1)`` images when ``images`` is True.
  """
  load_digits = require("sklearn.datasets", needed_by="data.digits").load_digits

  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
  data = load_digits()
  x = (data.data / 16.0).astype(np.float32)
  if images:
    x = x.reshape(-1, 8, 8, 1)
  order = np.random.default_rng(int_in_range("seed", seed, 0)).permutation(len(x))
  num_test = round(test_fraction * len(x))
  rows = order[:num_test] if split == "test" else order[num_test:]
  return ArraySource({"x": x[rows], "y": data.target[rows].astype(np.int32)}, num_classes=10)


def logistic_teacher(dim: int, seed: int) -> np.ndarray:
  """The teacher weights ``w* ~ N(0, I_dim)`` of :func:`synthetic_logistic` (float64)."""
  return np.random.default_rng((int_in_range("seed", seed, 0), 0)).standard_normal(dim)


def _logistic_split(w_star: np.ndarray, num_examples: int, noise: float, seed: int, stream: int) -> ArraySource:
  rng = np.random.default_rng((seed, stream))
  x = rng.uniform(-1.0, 1.0, size=(num_examples, w_star.shape[0]))
  y = (x @ w_star > 0) ^ (rng.random(num_examples) < noise)
  return ArraySource({"x": x.astype(np.float32), "y": y.astype(np.int32)}, num_classes=2)


def synthetic_logistic(
    num_examples: int = 20_000,
    dim: int = 512,
    *,
    noise: float = 0.0,
    num_test: int | None = None,
    seed: int = 0,
) -> tuple[ArraySource, ArraySource]:
  """Binary classification data from a linear teacher: ``(train, test)`` sources.

      x ~ U(-1, 1)^dim,   w* ~ N(0, I_dim),   y = 1[x·w* > 0] XOR flip,   flip ~ Bernoulli(noise)

  Args:
    num_examples: training examples (default 20,000), >= 1.
    dim: features (default 512), >= 1.
    noise: label-flip probability in [0, 0.5]; 0 gives separable data.
    num_test: test examples drawn the same way (default ``num_examples // 5``).
    seed: fixes ``w*`` (:func:`logistic_teacher`) and both splits.
  """
  num_examples = int_in_range("num_examples", num_examples, 1)
  dim = int_in_range("dim", dim, 1)
  num_test = int_in_range("num_test", max(num_examples // 5, 1) if num_test is None else num_test, 1)
  if not 0 <= noise <= 0.5:
    raise ValueError(f"noise (label-flip probability) must be in [0, 0.5], got {noise!r}.")
  w_star = logistic_teacher(dim, seed)
  return (
      _logistic_split(w_star, num_examples, noise, seed, stream=1),
      _logistic_split(w_star, num_test, noise, seed, stream=2),
  )
