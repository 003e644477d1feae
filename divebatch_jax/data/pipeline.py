"""The host pipeline: sample -> read -> pad to a bucket -> device -> augment + preprocess.

The training loop hands the batch size of the next step as a plain int and gets a
:class:`Batch` back: leaves ``(K, m, ...)`` on device, a ``(K, m)`` mask, and
where in the epoch it came from. Background threads prepare the following
batches with the same batch size while the device computes; when the loop asks
for a different size, the prepared batches are dropped and preparation restarts
from the current position, so the stream depends only on the sequence of batch
sizes, never on timing.

The host handles the stored rows (uint8 pixels for images): it reads them, draws
the augmentation's per-row parameters from a seeded generator, pads both to the
bucket and transfers them. The augmentation itself and the source's
``preprocess`` (e.g. ``/ 255`` and per-channel normalisation) then run as one
jitted function on the device, compiled once per bucket shape.

Determinism: epoch ``e``'s order depends only on ``(seed, e)``
(:func:`~divebatch_jax.data.sampler.epoch_order`); the augmentation of the step
starting at ``(e, p)`` only on ``(seed, e, p)``. Restoring a :class:`SamplerState`
therefore reproduces the uninterrupted stream exactly.

Padding is counted (:attr:`Pipeline.padding`) and logged at the end of every
epoch; its worst case per step is :func:`~divebatch_jax.data.buckets.worst_case_padding`.

Example::

    import numpy as np
    from divebatch_jax.data import Pipeline, bucket_ladder, digits

    pipeline = Pipeline(digits("train"), ladder=bucket_ladder(32, 256), seed=0)
    for batch in pipeline.epoch(0, batch_size=100):
      batch.data["x"].shape, batch.mask.shape      # (1, 128, 64), (1, 128)
    pipeline.close()
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, NamedTuple

import jax
import numpy as np

from divebatch_jax.data.buckets import BucketLadder, pad_to_bucket
from divebatch_jax.data.prefetch import Prefetcher
from divebatch_jax.data.sampler import EpochSampler, SamplerState, advance, check_batch_size, check_state
from divebatch_jax.data.sources import to_model_batch

logger = logging.getLogger(__name__)

_AUGMENT_STREAM = 1  # keeps the augmentation seeds apart from the epoch orders'


class Batch(NamedTuple):
  """One step's input.

  Attributes:
    data: ``{"x": float32 (K, m, ...), "y": int32 (K, m)}`` on device; padded rows
      hold a preprocessed all-zero stored row (masked out).
    mask: bool ``(K, m)`` on device, True on the ``num_real`` real rows.
    num_real: real examples in the step, ``min(batch_size, n − position)``.
    start: the sampler state at which the step starts.
    end_of_epoch: True for the last step of ``start.epoch``.
  """

  data: dict[str, jax.Array]
  mask: jax.Array
  num_real: int
  start: SamplerState
  end_of_epoch: bool


class PaddingLog(NamedTuple):
  """Rows delivered so far: real, padded, and the ``(K, m)`` shapes used."""

  real_rows: int = 0
  padded_rows: int = 0
  shapes: frozenset[tuple[int, int]] = frozenset()

  @property
  def fraction(self) -> float:
    """Padded share of all rows delivered (0 before any step)."""
    total = self.real_rows + self.padded_rows
    return self.padded_rows / total if total else 0.0

  def add(self, num_real: int, shape: tuple[int, int]) -> "PaddingLog":
    """The log after one more step of ``num_real`` real rows laid out as ``shape``."""
    return PaddingLog(
        self.real_rows + num_real,
        self.padded_rows + shape[0] * shape[1] - num_real,
        self.shapes | {tuple(shape)},
    )


class Pipeline:
  """Padded, masked, device-placed batches of any size from a random-access source.

  Args:
    source: an :class:`~divebatch_jax.data.sources.ArraySource`-like object
      (``num_examples``, ``read(indices)``, a jittable ``preprocess`` or None).
    ladder: the bucket sizes (:func:`~divebatch_jax.data.buckets.bucket_ladder`).
    seed: non-negative int fixing the epoch orders and the augmentation.
    shuffle: False serves ``0..n-1`` in order (evaluation).
    augment: e.g. :class:`~divebatch_jax.data.augment.CropFlip`: an object with
      ``draw(rng, num_rows) -> {name: (num_rows, ...) array}`` (host, NumPy) and
      a jittable ``apply(stored_rows, params) -> stored_rows`` (device), run
      before preprocessing.
    prefetch: batches prepared ahead in background threads; 0 prepares each
      batch synchronously in :meth:`next_batch`.
    workers: threads preparing batches, >= 1 (at most ``prefetch`` are used;
      none when ``prefetch`` is 0). On an H100 host, 2 workers delivered 1.6x
      what 1 did for 2048-image CIFAR batches (benchmarks/results/pipeline.md).
    device: where batches go (a ``jax.Device`` or ``jax.sharding.Sharding``);
      None for the default device.
    state: where to start (default epoch 0, position 0).
  """

  def __init__(
      self,
      source: Any,
      *,
      ladder: BucketLadder,
      seed: int = 0,
      shuffle: bool = True,
      augment: Any = None,
      prefetch: int = 4,
      workers: int = 2,
      device: Any = None,
      state: SamplerState = SamplerState(0, 0),
  ):
    self.source = source
    self.num_examples = source.num_examples
    self.ladder = ladder
    self._sampler = EpochSampler(self.num_examples, seed=seed, shuffle=shuffle, state=state)
    self.augment = augment
    if not isinstance(prefetch, int) or prefetch < 0:
      raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}.")
    self.prefetch = prefetch
    if not isinstance(workers, int) or workers < 1:
      raise ValueError(f"workers must be an int >= 1, got {workers!r}.")
    self.workers = min(workers, max(prefetch, 1))
    self.device = device
    sharding = device if isinstance(device, jax.sharding.Sharding) else None
    self._prepare = jax.jit(self._prepare_on_device, out_shardings=sharding)
    self.padding = PaddingLog()
    self._epoch_padding = PaddingLog()
    self._state = self._sampler.state
    self._producer: Iterator[Batch] | None = None
    self._producer_batch_size = 0

  @property
  def seed(self) -> int:
    return self._sampler.seed

  @property
  def state(self) -> SamplerState:
    """Where the next step starts (save it to resume)."""
    return self._state

  def restore(self, state: SamplerState) -> None:
    """Continues from ``state``: the stream equals the uninterrupted one."""
    self._state = check_state(state, self.num_examples)
    self._stop_producer()

  def _prepare_on_device(self, stored: dict, params: dict) -> dict:
    if self.augment is not None:
      stored = self.augment.apply(stored, params)
    return to_model_batch(stored, self.source.preprocess)

  def _local_columns(self, global_shape: tuple[int, int]) -> slice:
    """The rows ``m`` of every micro-batch that this process's devices hold."""
    index_map = self.device.addressable_devices_indices_map(global_shape)
    columns = [index[1] for index in index_map.values()]
    start = min(c.start or 0 for c in columns)
    stop = max(global_shape[1] if c.stop is None else c.stop for c in columns)
    return slice(start, stop)

  def _read_local(self, indices: np.ndarray, params: dict) -> tuple[dict, dict, np.ndarray, tuple[int, int]]:
    """Multi-process: read only this process's rows of the padded global batch.

    The global layout (which row sits where) is the single-process one; the
    augmentation parameters are drawn for the whole batch from the same seed and
    sliced, so every process sees exactly its part of the single-process batch.
    """
    positions, mask = pad_to_bucket({"row": np.arange(len(indices))}, self.ladder)
    columns = self._local_columns(mask.shape)
    local_rows, local_mask = positions["row"][:, columns], mask[:, columns]
    rows = self.source.read(indices[local_rows[local_mask]])
    stored = {}
    for name, values in rows.items():
      out = np.zeros(local_mask.shape + values.shape[1:], values.dtype)
      out[local_mask] = values
      stored[name] = out
    params = {name: value[:, columns] for name, value in params.items()}
    return stored, params, local_mask, mask.shape

  def _put(self, tree: Any, global_shape: tuple[int, int]) -> Any:
    """Process-local ``(K, m_local, ...)`` arrays as global ``(K, m, ...)`` arrays."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            self.device, x, global_shape + x.shape[2:]
        ),
        tree,
    )

  def _assemble(self, step: tuple[SamplerState, np.ndarray]) -> Batch:
    start, indices = step
    params = {}
    if self.augment is not None:
      rng = np.random.default_rng((self.seed, start.epoch, start.position, _AUGMENT_STREAM))
      params, _ = pad_to_bucket(self.augment.draw(rng, len(indices)), self.ladder)
    if jax.process_count() > 1 and isinstance(self.device, jax.sharding.Sharding):
      stored, params, mask, global_shape = self._read_local(indices, params)
      stored, params, device_mask = self._put((stored, params, mask), global_shape)
    else:
      stored, mask = pad_to_bucket(self.source.read(indices), self.ladder)
      stored, params, device_mask = jax.device_put((stored, params, mask), self.device)
    return Batch(
        data=self._prepare(stored, params),
        mask=device_mask,
        num_real=len(indices),
        start=start,
        end_of_epoch=start.position + len(indices) == self.num_examples,
    )

  def _steps(self, start: SamplerState, batch_size: int) -> Iterator[tuple[SamplerState, np.ndarray]]:
    """``(start, indices)`` of the steps from ``start`` on, all of ``batch_size``."""
    sampler = EpochSampler(
        self.num_examples, seed=self.seed, shuffle=self._sampler.shuffle, state=start
    )
    while True:
      step_start = sampler.state
      yield step_start, sampler.next_indices(batch_size)

  def _stop_producer(self) -> None:
    if isinstance(self._producer, Prefetcher):
      self._producer.close()
    self._producer = None

  def next_batch(self, batch_size: int) -> Batch:
    """The next step's batch: ``min(batch_size, n − position)`` real rows.

    ``batch_size`` may differ from the previous call's (also mid-epoch); it must
    be an int in ``[1, num_examples]``.
    """
    batch_size = check_batch_size(batch_size, self.num_examples)
    if self._producer is None or batch_size != self._producer_batch_size:
      self._stop_producer()
      steps = self._steps(self._state, batch_size)
      if self.prefetch:
        self._producer = Prefetcher(
            steps, self._assemble, buffer_size=self.prefetch, num_workers=self.workers
        )
      else:
        self._producer = map(self._assemble, steps)
      self._producer_batch_size = batch_size
    try:
      batch = next(self._producer)
    except BaseException:
      self._stop_producer()  # a failed producer is not reused; the next call restarts it
      raise
    self._state = advance(batch.start, batch.num_real, self.num_examples)
    self.padding = self.padding.add(batch.num_real, batch.mask.shape)
    self._epoch_padding = self._epoch_padding.add(batch.num_real, batch.mask.shape)
    if batch.end_of_epoch:
      log = self._epoch_padding
      logger.info(
          "epoch %d: %d real rows, %d padded rows (%.1f%% padding), shapes %s",
          batch.start.epoch, log.real_rows, log.padded_rows, 100 * log.fraction, sorted(log.shapes),
      )
      self._epoch_padding = PaddingLog()
    return batch

  def epoch(self, epoch: int, batch_size: int | Callable[[], int]) -> Iterator[Batch]:
    """The steps of ``epoch`` from the current position (from its start if elsewhere).

    ``batch_size`` is an int, or a function called before each step for the next
    step's batch size (e.g. reading what the policy decided).
    """
    if self._state.epoch != epoch:
      self.restore(SamplerState(epoch, 0))
    while self._state.epoch == epoch:
      yield self.next_batch(batch_size() if callable(batch_size) else batch_size)

  def close(self) -> None:
    """Stops the prefetch threads."""
    self._stop_producer()

  def __enter__(self) -> "Pipeline":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
