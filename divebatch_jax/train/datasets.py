"""``--dataset`` names to train/test sources (all offline).

* ``synthetic``: the DiveBatch authors' logistic-regression prototype
  (n = ``--num-examples`` or 20,000, d = 512, features U(-1, 1), w* ~ N(0, I));
* ``digits``: scikit-learn's bundled 8x8 digits (1,438 train / 359 test);
* ``cifar10``: TFDS ``cifar10`` if prepared in ``--data-dir``, else ``cifar10_jpeg``
  (``../shared/data/tfds`` by default); random crop + flip augmentation;
* ``tfds:NAME``: any prepared TFDS image-classification data set in ``--data-dir``;
* ``tinyshakespeare``: the character corpus in ``../shared/data/text`` (or ``--data-dir``)
  as ``(T,)`` windows of byte ids with per-token next-byte targets
  (:func:`divebatch_jax.data.text_windows`; first 90% train, last 10% test; T =
  ``--context``, default the ``--model`` GPT's context, else 64);
* ``text:PATH``: any text file, the same way;
* ``npz:PATH``: your own arrays, a ``.npz`` with ``x_train``, ``y_train``, ``x_test``,
  ``y_test`` and optionally ``num_classes`` (uint8 NHWC images are scaled to [0, 1] and
  normalised per channel with the training set's mean and std, and augmented; anything
  else is used as given), validated at load by :func:`divebatch_jax.data.sources.npz_source`.

``--num-examples`` / ``--num-test-examples`` take a seeded random subset of a
real data set (the size of the generated one for ``synthetic``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from divebatch_jax import data
from divebatch_jax.data.sources import npz_source
from divebatch_jax.train.config import TrainConfig, with_defaults
from divebatch_jax.train.gpt import GPT_SIZES

DEFAULT_CONTEXT = 64  # tokens per window for text data and a non-GPT model


class Dataset(NamedTuple):
  """The loaded data set; ``notes`` are lines for the run's log (e.g. an inferred class count)."""

  name: str
  train: Any
  test: Any
  input_shape: tuple[int, ...]
  num_classes: int
  augment: bool
  notes: tuple[str, ...] = ()
  tokens_per_example: int = 0  # text windows: predicted tokens per example (T); 0 otherwise


def _subset(source, size: int | None, seed: int):
  """A seeded random subset of ``size`` examples, held in memory (stored form kept)."""
  if size is None or size >= source.num_examples:
    return source
  rows = np.sort(np.random.default_rng((seed, 7)).choice(source.num_examples, size, replace=False))
  if isinstance(source, data.ArraySource):
    stored = {k: v[rows] for k, v in source.arrays.items()}
  else:
    stored = source.read(rows)
  return data.ArraySource(stored, num_classes=source.num_classes, preprocess=source.preprocess)


def _whole_split_notes(config: TrainConfig, train, test) -> tuple[str, ...]:
  """A note per --num-examples / --num-test-examples above its split's size (the whole split is used)."""
  notes = []
  for flag, size, source in (("--num-examples", config.num_examples, train),
                             ("--num-test-examples", config.num_test_examples, test)):
    if size is not None and size > source.num_examples:
      notes.append(f"{flag} {size} is larger than the split (n = {source.num_examples} examples); "
                   f"using all {source.num_examples}.")
  return tuple(notes)


def load_dataset(config: TrainConfig) -> Dataset:
  """The train and test sources ``config`` names, subset as asked."""
  config = with_defaults(config)
  name = config.dataset
  if name == "synthetic":
    train, test = data.synthetic_logistic(
        config.num_examples or 20_000,
        num_test=config.num_test_examples,
        noise=0.05,
        seed=config.seed,
    )
    return Dataset("synthetic", train, test, train.element_spec["x"].shape, 2, False)
  if name == "tinyshakespeare" or name.startswith("text:"):
    return _load_text(config)
  notes = ()
  if name.startswith("npz:"):
    train, test, augment, notes = npz_source(name[4:])
  elif name == "digits":
    images = config.model not in ("logreg", "mlp")  # (8, 8, 1) for the convolutional models
    train, test = data.digits("train", images=images), data.digits("test", images=images)
    augment = False
  else:
    # A subset is decoded row by row (streaming first), the whole split at once otherwise.
    def open_split(split, size):
      lazy = {} if size is None else {"max_memory_bytes": 0}
      if name == "cifar10":
        return data.cifar10(split, config.data_dir, **lazy)
      return data.tfds_source(name.split(":", 1)[1], split, config.data_dir, **lazy)

    train = open_split("train", config.num_examples)
    test = open_split("test", config.num_test_examples)
    augment = len(train.element_spec["x"].shape) == 3
  if config.augment is not None:
    augment = config.augment
  notes = notes + _whole_split_notes(config, train, test)
  train = _subset(train, config.num_examples, config.seed)
  test = _subset(test, config.num_test_examples, config.seed)
  shape = tuple(train.element_spec["x"].shape)
  return Dataset(name, train, test, shape, train.num_classes, augment, notes)


def _load_text(config: TrainConfig) -> Dataset:
  """Text windows: tinyshakespeare or ``text:PATH``, 90/10 split, subset as asked."""
  name = config.dataset
  path = data.tinyshakespeare_path(config.data_dir) if name == "tinyshakespeare" else name[5:]
  default = GPT_SIZES[config.model].context if config.model in GPT_SIZES else DEFAULT_CONTEXT
  context = config.context or default
  train = data.text_windows(path, context, split="train")
  test = data.text_windows(path, context, split="validation")
  vocabulary = train.vocabulary
  train = _subset(train, config.num_examples, config.seed)
  test = _subset(test, config.num_test_examples, config.seed)
  notes = (f"{name}: {vocabulary.size} symbols, context {context}, {train.num_examples} training "
           f"windows ({train.num_examples * context:,} tokens), {test.num_examples} test windows",)
  return Dataset(name, train, test, (context,), vocabulary.size, False, notes, tokens_per_example=context)
