"""The data pipeline: sample -> lay out as micro-batches -> device -> augment + preprocess.

The training loop hands the batch size of the next step as a plain int and gets a
:class:`Batch` back: K micro-batches of m rows on device, each with its mask of
real rows, and where in the epoch the step came from. A step of b rows is laid
out by the ladder (:mod:`~divebatch_jax.data.buckets`): one micro-batch of the
smallest ladder size >= b, or K = ⌈b/m⌉ micro-batches of the largest size m with
the rows spread evenly. Background threads prepare the following steps with the
same batch size while the device computes; when the loop asks for a different
size, the prepared steps are dropped and preparation restarts from the current
position, so the stream depends only on the sequence of batch sizes, never on
timing.

Two ways to the device. Where the data set fits in device memory (CIFAR-sized
data does) it is held there (``resident``) and each micro-batch is gathered by
index on the device: the host sends only indices and the augmentation's draws.
Otherwise the host reads the stored rows (uint8 pixels for images), pads them and
transfers them. Either way the augmentation and the source's ``preprocess``
(e.g. ``/ 255`` and per-channel normalisation) run on the device in one jitted
function, compiled once per micro-batch size. On one CPU device, rows that need
neither are prepared with NumPy (``on_host``): no executable per micro-batch size.

Determinism: epoch ``e``'s order depends only on ``(seed, e)``
(:func:`~divebatch_jax.data.sampler.epoch_order`); the augmentation of the step
starting at ``(e, p)`` only on ``(seed, e, p)``. Restoring a :class:`SamplerState`
therefore reproduces the uninterrupted stream exactly.

Padding is counted (:attr:`Pipeline.padding`) and logged at the end of every
epoch; its worst case per step is :func:`~divebatch_jax.data.buckets.worst_case_padding`.

Example (1438 rows in steps of 600: two steps of K = 3 micro-batches of 256, then 238 rows)::

    >>> from divebatch_jax.data import Pipeline, bucket_ladder, digits
    >>> with Pipeline(digits("train"), ladder=bucket_ladder(32, 256), seed=0) as pipeline:
    ...   batches = list(pipeline.epoch(0, batch_size=600))
    >>> [(batch.shape, batch.num_real, batch.end_of_epoch) for batch in batches]
    [((3, 256), 600, False), ((3, 256), 600, False), ((1, 256), 238, True)]
    >>> [(data["x"].shape, int(mask.sum())) for data, mask in batches[0].micro_batches]
    [((256, 64), 200), ((256, 64), 200), ((256, 64), 200)]
    >>> batches[0].data["x"].shape, batches[0].mask.shape
    ((3, 256, 64), (3, 256))
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from divebatch_jax._aot import Executables
from divebatch_jax.data.buckets import BucketLadder, pad_to_bucket
from divebatch_jax.data.prefetch import Prefetcher
from divebatch_jax.data.sampler import EpochSampler, SamplerState, advance, check_batch_size, check_state
from divebatch_jax.data.sources import to_model_batch

logger = logging.getLogger(__name__)

_AUGMENT_STREAM = 1  # keeps the augmentation seeds apart from the epoch orders'


class Batch(NamedTuple):
  """One step's input: K micro-batches of m rows on device, and where it came from.

  Attributes:
    micro_batches: K pairs ``(data, mask)``: ``data = {"x": float32 (m, ...),
      "y": int32 (m,)}`` and a bool ``(m,)`` mask, True on real rows; padded rows
      hold a preprocessed all-zero stored row. A training engine runs them one
      call each (one executable per m, whatever K).
    num_real: real examples in the step, ``min(batch_size, n − position)``.
    start: the sampler state at which the step starts.
    end_of_epoch: True for the last step of ``start.epoch``.

  ``data`` and ``mask`` give the stacked ``(K, m, ...)`` / ``(K, m)`` layout for a
  step that sums the micro-batches inside one jitted call.
  """

  micro_batches: tuple[tuple[dict[str, jax.Array], jax.Array], ...]
  num_real: int
  start: SamplerState
  end_of_epoch: bool

  @property
  def shape(self) -> tuple[int, int]:
    """``(K, m)``: micro-batches and rows per micro-batch."""
    return len(self.micro_batches), int(self.micro_batches[0][1].shape[0])

  @property
  def data(self) -> dict[str, jax.Array]:
    """The micro-batches stacked as ``(K, m, ...)`` leaves."""
    return jax.tree.map(lambda *parts: jnp.stack(parts), *(d for d, _ in self.micro_batches))

  @property
  def mask(self) -> jax.Array:
    """The ``(K, m)`` mask of real rows."""
    return jnp.stack([m for _, m in self.micro_batches])


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


def _spread(rows: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
  """The real ``rows`` placed where ``mask`` is True, zero rows elsewhere."""
  stored = {}
  for name, values in rows.items():
    out = np.zeros(mask.shape + values.shape[1:], values.dtype)
    out[mask] = values
    stored[name] = out
  return stored


class Pipeline:
  """Padded, masked, device-placed batches of any size from a random-access source.

  Args:
    source: an :class:`~divebatch_jax.data.sources.ArraySource`-like object
      (``num_examples``, ``read(indices)``, a jittable ``preprocess`` or None).
    ladder: the micro-batch sizes (:func:`~divebatch_jax.data.buckets.bucket_ladder`);
      its largest size is the micro-batch m a larger step is split into.
    seed: non-negative int fixing the epoch orders and the augmentation.
    shuffle: False serves ``0..n-1`` in order (evaluation).
    augment: e.g. :class:`~divebatch_jax.data.augment.CropFlip`: an object with
      ``draw(rng, num_rows) -> {name: (num_rows, ...) array}`` (host, NumPy) and
      a jittable ``apply(stored_rows, params) -> stored_rows`` (device), run
      before preprocessing.
    prefetch: steps prepared ahead in background threads; 0 prepares each step
      synchronously in :meth:`next_batch`.
    workers: threads preparing steps, >= 1 (at most ``prefetch`` are used;
      none when ``prefetch`` is 0).
    device: where batches go (a ``jax.Device`` or a ``jax.sharding.Sharding`` of
      the ``(m, ...)`` micro-batches); None for the default device.
    state: where to start (default epoch 0, position 0).
    resident: hold the source's stored rows on the device (``True``), or read and
      transfer every step's rows from the host (``False``); ``"auto"`` holds them
      there when the source is in memory (an ``arrays`` dict), a single process
      runs, and they take at most ``resident_max_bytes``. Resident data is
      gathered by index on the device: the host sends only indices and the
      augmentation's parameters.
    resident_max_bytes: the "auto" budget (default 2 GiB).
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
      resident: bool | str = "auto",
      resident_max_bytes: int = 2 * 2**30,
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
    self._sharding = device if isinstance(device, jax.sharding.Sharding) else None
    self.on_host = self._prepares_on_host(resident)
    self.resident = False if self.on_host else self._decide_resident(resident, resident_max_bytes)
    self._table = None
    if self.resident:
      self._table = jax.device_put(dict(source.arrays), self._replicated())
    self.executables = Executables()  # one preparation per micro-batch size
    self.padding = PaddingLog()
    self._epoch_padding = PaddingLog()
    self._state = self._sampler.state
    self._producer: Iterator[Batch] | None = None
    self._producer_batch_size = 0

  def _decide_resident(self, resident: bool | str, max_bytes: int) -> bool:
    if resident not in (True, False, "auto"):
      raise ValueError(f"resident must be True, False or 'auto', got {resident!r}.")
    arrays = getattr(self.source, "arrays", None)
    if resident is True and arrays is None:
      raise ValueError("resident=True needs a source held in memory (an ArraySource with .arrays).")
    if resident != "auto":
      return bool(resident)
    if arrays is None or jax.process_count() > 1:
      return False
    return sum(np.asarray(v).nbytes for v in arrays.values()) <= max_bytes

  def _prepares_on_host(self, resident: bool | str) -> bool:
    """Micro-batches prepared with NumPy, compiling nothing: on one CPU device (host
    memory is device memory there), with no augmentation and no ``preprocess``, unless
    ``resident=True`` asks for the device gather."""
    if resident is True or self.augment is not None or getattr(self.source, "preprocess", None) is not None:
      return False
    if self._sharding is not None:
      devices = self._sharding.device_set
    else:
      devices = {self.device if isinstance(self.device, jax.Device) else jax.devices()[0]}
    return jax.process_count() == 1 and len(devices) == 1 and all(d.platform == "cpu" for d in devices)

  def _replicated(self):
    if self._sharding is None:
      return self.device
    return jax.sharding.NamedSharding(self._sharding.mesh, jax.sharding.PartitionSpec())

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

  def _gather_on_device(self, table: dict, rows: jax.Array, mask: jax.Array, params: dict) -> dict:
    """The micro-batch of stored ``rows`` (zeros where ``mask`` is False), prepared."""
    stored = {}
    for name, values in table.items():
      picked = jnp.take(values, rows, axis=0)
      keep = mask.reshape(mask.shape + (1,) * (picked.ndim - 1))
      stored[name] = jnp.where(keep, picked, jnp.zeros((), picked.dtype))
    return self._prepare_on_device(stored, params)

  def _preparation(self, args: tuple):
    """The executable preparing one micro-batch (a gather when resident), one per size."""
    fn = self._gather_on_device if self.resident else self._prepare_on_device
    return self.executables.get("prepare", lambda: jax.jit(fn, out_shardings=self._sharding), args)

  def _prepare(self, *args):
    return self._preparation(args)(*args)

  def precompile(self, sizes) -> None:
    """Compiles the preparation of micro-batches of each of ``sizes`` rows ahead of need."""
    if self.on_host:  # NumPy prepares them: nothing to compile
      return
    stored = self.source.read([0])
    with self.executables.ahead():
      for size in sizes:
        mask = jax.ShapeDtypeStruct((size,), jnp.bool_, sharding=self._sharding)
        params = {}
        if self.augment is not None:
          drawn = self.augment.draw(np.random.default_rng(0), size)
          params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self._sharding) for k, v in drawn.items()}
        if self.resident:
          rows = jax.ShapeDtypeStruct((size,), jnp.int32, sharding=self._sharding)
          args = (self._table, rows, mask, params)
        else:
          args = ({k: jax.ShapeDtypeStruct((size, *v.shape[1:]), v.dtype, sharding=self._sharding)
                   for k, v in stored.items()}, params)
        self._preparation(args)

  def _local_rows(self, rows: int) -> slice:
    """The rows of an ``(m, ...)`` micro-batch that this process's devices hold."""
    index_map = self._sharding.addressable_devices_indices_map((rows,))
    spans = [index[0] for index in index_map.values()]
    start = min(span.start or 0 for span in spans)
    stop = max(rows if span.stop is None else span.stop for span in spans)
    return slice(start, stop)

  def _put(self, tree: Any, global_rows: int) -> Any:
    """This process's rows of ``(m, ...)`` arrays as global arrays."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self._sharding, x, (global_rows,) + x.shape[1:]),
        tree,
    )

  def _micro_batch(self, indices: np.ndarray, mask: np.ndarray, params: dict) -> tuple[dict, jax.Array]:
    """One micro-batch on the device from its padded indices, mask and augmentation draws."""
    if self.on_host:
      data = to_model_batch(_spread(self.source.read(indices[mask]), mask), None)
      return jax.device_put((data, mask), self.device)
    if self.resident:
      rows, mask_d, params = jax.device_put((indices.astype(np.int32), mask, params), self.device)
      return self._prepare(self._table, rows, mask_d, params), mask_d
    if jax.process_count() > 1 and self._sharding is not None:
      local = self._local_rows(len(mask))
      local_idx, local_mask = indices[local], mask[local]
      stored = _spread(self.source.read(local_idx[local_mask]), local_mask)
      stored, params, device_mask = self._put(
          (stored, {k: v[local] for k, v in params.items()}, local_mask), len(mask)
      )
      return self._prepare(stored, params), device_mask
    stored = _spread(self.source.read(indices[mask]), mask)
    stored, params, device_mask = jax.device_put((stored, params, mask), self.device)
    return self._prepare(stored, params), device_mask

  def _assemble(self, step: tuple[SamplerState, np.ndarray]) -> Batch:
    start, indices = step
    rows = {"index": indices}
    if self.augment is not None:
      rng = np.random.default_rng((self.seed, start.epoch, start.position, _AUGMENT_STREAM))
      rows.update(self.augment.draw(rng, len(indices)))
    padded, mask = pad_to_bucket(rows, self.ladder)
    index = padded.pop("index")
    micro = tuple(
        self._micro_batch(index[k], mask[k], {name: v[k] for name, v in padded.items()})
        for k in range(mask.shape[0])
    )
    return Batch(
        micro_batches=micro,
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
    self.padding = self.padding.add(batch.num_real, batch.shape)
    self._epoch_padding = self._epoch_padding.add(batch.num_real, batch.shape)
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
