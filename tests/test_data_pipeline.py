"""Pipeline: exactly-once epochs under changing batch sizes, exact resume, one compile per
bucket over a 128 -> 2048 schedule, padded step == unpadded step, padding log, errors."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from divebatch_jax.stats import accumulate_gradients
from divebatch_jax.compilations import CompileCounter
from divebatch_jax.data import (
    ArraySource,
    CropFlip,
    ImagePreprocess,
    Pipeline,
    SamplerState,
    bucket_ladder,
    epoch_order,
    synthetic_logistic,
    worst_case_padding,
)


def _index_source(n):
  """x[i] = (i, i): the real rows of a batch say which examples it holds."""
  return ArraySource({"x": np.repeat(np.arange(n, dtype=np.float32)[:, None], 2, 1), "y": np.arange(n) % 3}, num_classes=3)


def _real_indices(batch):
  mask = np.asarray(batch.mask)
  return np.asarray(batch.data["x"])[mask][:, 0].astype(int)


def _run(pipeline, schedule, num_steps):
  return [pipeline.next_batch(schedule[i % len(schedule)]) for i in range(num_steps)]


@pytest.mark.parametrize("prefetch, workers", [(0, 1), (2, 1), (4, 3)])
def test_every_example_once_per_epoch_with_mid_epoch_changes(prefetch, workers):
  n, seed = 203, 5
  schedule = [16, 16, 40, 3, 64, 100, 7, 7, 130]
  ladder = bucket_ladder(8, 64)
  with Pipeline(_index_source(n), ladder=ladder, seed=seed, prefetch=prefetch, workers=workers) as pipeline:
    batches = _run(pipeline, schedule, 40)
  position = {0: 0}
  for i, batch in enumerate(batches):
    epoch = batch.start.epoch
    position.setdefault(epoch, 0)
    assert batch.start == SamplerState(epoch, position[epoch])
    assert batch.num_real == min(schedule[i % len(schedule)], n - position[epoch])
    assert batch.num_real == int(np.asarray(batch.mask).sum())  # the last step is padded, not dropped
    position[epoch] += batch.num_real
    assert batch.end_of_epoch == (position[epoch] == n)
  completed = [e for e, p in position.items() if p == n]
  assert len(completed) >= 2
  for epoch in completed:
    served = np.concatenate([_real_indices(b) for b in batches if b.start.epoch == epoch])
    assert np.array_equal(served, epoch_order(n, seed, epoch))  # each example once, in order


def _image_source(n=96):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(n, 8, 8, 3)).astype(np.uint8)
  return ArraySource({"x": images, "y": rng.integers(0, 10, n)}, num_classes=10, preprocess=ImagePreprocess((0.5,) * 3, (0.25,) * 3))


def _assert_same_stream(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.start == y.start and x.num_real == y.num_real
    assert np.array_equal(x.mask, y.mask)
    for name in x.data:
      assert np.array_equal(x.data[name], y.data[name])


def test_resume_equals_uninterrupted_stream_with_augmentation():
  schedule = [10, 25, 7, 40, 33]
  kwargs = dict(ladder=bucket_ladder(8, 32), seed=11, augment=CropFlip(padding=2))
  with Pipeline(_image_source(), **kwargs) as pipeline:
    full = _run(pipeline, schedule, 23)
  for cut in (1, 9, 17):  # mid-epoch resumes, augmented differently per (epoch, position)
    with Pipeline(_image_source(), **kwargs) as first:
      head = _run(first, schedule, cut)
      saved = first.state
    with Pipeline(_image_source(), **kwargs) as resumed:
      resumed.restore(saved)
      tail = [resumed.next_batch(schedule[i % len(schedule)]) for i in range(cut, 23)]
    _assert_same_stream(head + tail, full)
  with Pipeline(_image_source(), prefetch=0, **kwargs) as synchronous:  # timing never matters
    _assert_same_stream(_run(synchronous, schedule, 23), full)
  with Pipeline(_image_source(), prefetch=5, workers=4, **kwargs) as parallel:
    _assert_same_stream(_run(parallel, schedule, 23), full)
  # The augmentation does act: a pipeline without it serves the same rows, different pixels.
  with Pipeline(_image_source(), ladder=kwargs["ladder"], seed=11) as plain:
    first_plain = plain.next_batch(10)
  assert np.array_equal(first_plain.mask, full[0].mask)
  assert not np.array_equal(first_plain.data["x"], full[0].data["x"])


def test_resident_and_host_paths_serve_the_same_stream():
  """Data held on the device and gathered by index equals data read and sent by the host."""
  schedule = [10, 25, 7, 40, 33]
  kwargs = dict(ladder=bucket_ladder(8, 32), seed=4, augment=CropFlip(padding=2))
  with Pipeline(_image_source(), resident=True, **kwargs) as resident:
    on_device = _run(resident, schedule, 17)
    assert resident.resident
  with Pipeline(_image_source(), resident=False, prefetch=0, **kwargs) as host:
    from_host = _run(host, schedule, 17)
    assert not host.resident
  _assert_same_stream(on_device, from_host)
  assert Pipeline(_image_source(), resident="auto", ladder=bucket_ladder(8, 32)).resident
  assert not Pipeline(_image_source(), resident="auto", resident_max_bytes=10, ladder=bucket_ladder(8, 32)).resident
  with pytest.raises(ValueError, match="resident"):
    Pipeline(_BrokenSource(), resident=True, ladder=bucket_ladder(4, 8))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the NumPy path is the CPU's")
def test_cpu_prepares_plain_rows_with_numpy_compiling_nothing():
  """On one CPU device, rows with no augmentation and no preprocess are prepared with NumPy:
  no executable per micro-batch size, and the same stream as the device gather."""
  source = ArraySource({"x": np.random.default_rng(0).normal(size=(90, 3)).astype(np.float32),
                        "y": np.arange(90) % 3}, num_classes=3)
  schedule, ladder = [10, 25, 7, 40, 33], bucket_ladder(8, 32)
  with Pipeline(source, ladder=ladder, seed=4, resident=True, prefetch=0) as on_device:
    gathered = _run(on_device, schedule, 12)
  with CompileCounter() as compiles, Pipeline(source, ladder=ladder, seed=4, prefetch=0) as host:
    host.precompile(ladder.sizes)
    prepared = _run(host, schedule, 12)
  assert host.on_host and not host.resident and not on_device.on_host
  assert compiles.count == 0, compiles.by_function
  _assert_same_stream(gathered, prepared)
  for a, b in zip(gathered, prepared):
    assert a.data["x"].dtype == b.data["x"].dtype and a.data["y"].dtype == b.data["y"].dtype


def test_augmented_rows_are_crops_and_flips_of_their_own_images():
  source = _image_source(40)
  preprocess = source.preprocess
  with Pipeline(source, ladder=bucket_ladder(8, 16), seed=3, augment=CropFlip(padding=2)) as pipeline:
    batches = [pipeline.next_batch(13) for _ in range(4)]  # (1, 16) layouts, then the last 1 row
  order = epoch_order(40, 3, 0)
  for batch in batches:
    mask = np.asarray(batch.mask)
    rows = np.asarray(batch.data["x"])[mask]
    labels = np.asarray(batch.data["y"])[mask]
    indices = order[batch.start.position : batch.start.position + batch.num_real]
    assert np.array_equal(labels, source.arrays["y"][indices])
    for row, i in zip(rows, indices):
      image = source.arrays["x"][i]
      padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
      candidates = [
          w[:, ::-1] if flip else w
          for dy in range(5) for dx in range(5) for flip in (False, True)
          for w in [padded[dy : dy + 8, dx : dx + 8]]
      ]
      expected = [preprocess({"x": c[None]})["x"][0] for c in candidates]
      assert any(np.allclose(row, e, atol=1e-6) for e in expected)


def _sgd_step(w, batch, mask):
  loss, grad, _ = accumulate_gradients(_logistic_loss, w, batch, mask)
  return w - 0.5 * grad, loss


def _logistic_loss(w, batch):
  logits = batch["x"] @ w
  return jnp.logaddexp(0.0, logits) - batch["y"] * logits


def test_compiles_at_most_once_per_bucket_over_128_to_2048_schedule():
  train, _ = synthetic_logistic(4096, 8, noise=0.1, seed=0)
  ladder = bucket_ladder(128, 512)
  train_step = jax.jit(_sgd_step)
  schedule = [128, 128, 200, 256, 256, 300, 512, 640, 1024, 1024, 1500, 2048, 2048, 1800, 128, 2048]
  w = jnp.zeros(8)
  with Pipeline(train, ladder=ladder, seed=0) as pipeline, CompileCounter() as compiles:
    for _ in range(2):  # every size twice: no second compile for any shape
      for b in schedule:
        batch = pipeline.next_batch(b)
        w, loss = train_step(w, batch.data, batch.mask)
    assert np.isfinite(float(loss))
  used = pipeline.padding.shapes
  budget = ladder.shapes_up_to(2048)  # (1,128) (1,256) (1,512) (2,512) (3,512) (4,512)
  assert len(budget) == 6 and used <= set(budget)
  assert compiles.count_of("_sgd_step") == len(used) <= len(budget)
  assert (1, 128) in used and (4, 512) in used and (3, 512) in used


@jax.default_matmul_precision("float32")  # no TF32 on GPUs: compare at 1e-6
def test_padded_step_equals_unpadded_step():
  train, _ = synthetic_logistic(600, 8, noise=0.1, seed=1)
  w0 = jnp.asarray(np.random.default_rng(0).normal(size=8), jnp.float32)
  train_step = jax.jit(_sgd_step)
  reference = jax.jit(jax.value_and_grad(lambda w, rows: jnp.mean(_logistic_loss(w, rows))))
  with Pipeline(train, ladder=bucket_ladder(16, 128), seed=2, prefetch=0) as pipeline:
    for b in (100, 300, 37, 163):  # (1,128), (3,128) with 100 each, (1,64), last step: 163 rows
      batch = pipeline.next_batch(b)
      indices = epoch_order(600, 2, 0)[batch.start.position : batch.start.position + batch.num_real]
      w_padded, loss_padded = train_step(w0, batch.data, batch.mask)
      loss, grad = reference(w0, train.gather(indices))
      np.testing.assert_allclose(loss_padded, loss, rtol=1e-6)
      np.testing.assert_allclose(w_padded, w0 - 0.5 * grad, rtol=1e-6, atol=1e-6)
    assert batch.end_of_epoch and np.asarray(batch.mask).shape == (2, 128)


def test_padding_is_counted_bounded_and_logged(caplog):
  n = 1000
  ladder = bucket_ladder(32, 256)
  schedule = [32, 50, 128, 200, 256, 300, 700]
  with caplog.at_level(logging.INFO, logger="divebatch_jax.data.pipeline"):
    with Pipeline(_index_source(n), ladder=ladder, seed=0, prefetch=0) as pipeline:
      fractions, rows = [], 0
      for batch in (b for epoch in range(2) for b in pipeline.epoch(epoch, iter(schedule * 50).__next__)):
        size = np.asarray(batch.mask).size
        fractions.append(1 - batch.num_real / size)
        rows += size
  log = pipeline.padding
  assert log.real_rows == 2 * n and log.padded_rows == rows - 2 * n
  assert log.fraction == pytest.approx(log.padded_rows / rows)
  assert max(fractions) <= worst_case_padding(ladder, 1, 700)
  messages = [r.getMessage() for r in caplog.records if "padded rows" in r.getMessage()]
  assert len(messages) == 2 and messages[0].startswith("epoch 0: 1000 real rows")


def test_epoch_asks_for_each_steps_batch_size_and_resumes_mid_epoch():
  asked = []

  def next_size():
    asked.append(len(asked))
    return 10 + 5 * len(asked)

  with Pipeline(_index_source(100), ladder=bucket_ladder(8, 64), seed=1) as pipeline:
    sizes = [b.num_real for b in pipeline.epoch(0, next_size)]
    assert sizes == [15, 20, 25, 30, 10] and len(asked) == 5
    assert pipeline.state == SamplerState(1, 0)
    pipeline.restore(SamplerState(3, 40))
    served = np.concatenate([_real_indices(b) for b in pipeline.epoch(3, 25)])
    assert np.array_equal(served, epoch_order(100, 1, 3)[40:])
    first = next(iter(pipeline.epoch(0, 100)))  # another epoch: from its start
    assert first.start == SamplerState(0, 0)


class _BrokenSource:
  num_examples = 10
  preprocess = None

  def read(self, indices):
    raise OSError("disk gone")


@pytest.mark.parametrize("prefetch", [0, 2])
def test_source_errors_reach_the_caller(prefetch):
  with Pipeline(_BrokenSource(), ladder=bucket_ladder(4, 8), prefetch=prefetch) as pipeline:
    with pytest.raises(OSError, match="disk gone"):
      pipeline.next_batch(4)
    with pytest.raises(OSError, match="disk gone"):  # and again: not a silent StopIteration
      pipeline.next_batch(4)


@pytest.mark.parametrize(
    "batch_size, error, match",
    [(0, ValueError, "positive"), (101, ValueError, "larger than the data set"), (2.5, TypeError, "int")],
)
def test_bad_batch_size_is_named(batch_size, error, match):
  with Pipeline(_index_source(100), ladder=bucket_ladder(8, 64)) as pipeline:
    with pytest.raises(error, match=match):
      pipeline.next_batch(batch_size)


def test_bad_prefetch_and_state_are_named():
  with pytest.raises(ValueError, match="prefetch"):
    Pipeline(_index_source(10), ladder=bucket_ladder(4, 8), prefetch=-1)
  with pytest.raises(ValueError, match="state.position"):
    Pipeline(_index_source(10), ladder=bucket_ladder(4, 8), state=SamplerState(0, 10))
