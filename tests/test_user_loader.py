"""The user's own loader: ``data.pad_batch`` / ``data.epoch_batches`` and ``drop_remainder``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import divebatch_jax as dbj
from divebatch_jax import data


def test_pad_batch_keeps_rows_and_masks_padding_for_any_pytree():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(11, 3)).astype(np.float32), rng.integers(0, 5, 11)
  ladder = data.bucket_ladder(4, 8)  # sizes 4, 8; 11 rows -> 2 micro-batches of 8
  (px, py), mask = data.pad_batch((x, y), ladder)
  assert px.shape == (16, 3) and py.shape == (16,) and mask.shape == (16,)
  np.testing.assert_array_equal(px[mask], x)  # real rows in order, nothing lost
  np.testing.assert_array_equal(py[mask], y)
  assert not px[~mask].any() and mask.sum() == 11
  padded, mask = data.pad_batch({"x": x[:3]}, [8, 4])
  assert padded["x"].shape == (4, 3) and mask.tolist() == [True] * 3 + [False]


def test_pad_batch_names_bad_input():
  with pytest.raises(ValueError, match="share one leading dimension"):
    data.pad_batch({"x": np.ones(3), "y": np.ones(4)}, [4])
  with pytest.raises(ValueError, match="ladder size"):
    data.pad_batch({"x": np.ones(3)}, [0, 4])


def _loss(w, batch):
  return 0.5 * (batch["x"] @ w - batch["y"]) ** 2


def test_a_hand_written_loop_compiles_once_per_ladder_shape():
  n, ladder = 50, data.bucket_ladder(4, 16)
  rng = np.random.default_rng(1)
  arrays = {"x": rng.normal(size=(n, 3)).astype(np.float32), "y": rng.normal(size=n).astype(np.float32)}
  tx = dbj.adaptive_batch(optax.sgd(0.05), dbj.policies.divebatch(2.0, 32, resize_every=1),
                          num_examples=n, base_batch_size=4, batch_sizes=ladder.batch_sizes(n))
  traces = []

  @jax.jit
  def step(w, state, batch, mask):
    traces.append(batch["x"].shape)
    _, grad, stats = dbj.gradient_stats(_loss, w, batch, mask)
    updates, state = tx.update(grad, state, w, stats=stats)
    return optax.apply_updates(w, updates), state

  w, state, sizes = jnp.zeros(3), tx.init(jnp.zeros(3)), []
  for epoch in range(4):
    b = dbj.current_batch_size(state, epoch=epoch)
    sizes.append(b)
    order = np.random.default_rng(epoch).permutation(n)
    for batch, mask in data.epoch_batches(arrays, b, ladder, order=order):
      w, state = step(w, state, batch, mask)
  assert sizes[-1] > sizes[0]
  allowed = {(k * m, 3) for k, m in ladder.shapes_up_to(32)}
  assert set(traces) <= allowed and len(traces) == len(set(traces))  # one compile per shape
  assert int(dbj.find_state(state).examples_seen) == 4 * n


def test_drop_remainder_loader_with_a_growing_batch_keeps_the_epochs():
  """A tf.data-style loader (batch(b, drop_remainder=True)) and DiveBatch: the count of
  each epoch is the loop's own, the remainder dropped."""
  n, ladder = 30, data.bucket_ladder(4, 16)
  rng = np.random.default_rng(2)
  arrays = {"x": rng.normal(size=(n, 3)).astype(np.float32), "y": rng.normal(size=n).astype(np.float32)}
  tx = dbj.adaptive_batch(optax.sgd(0.05), dbj.policies.divebatch(2.0, 16, resize_every=1),
                          num_examples=n, base_batch_size=4, batch_sizes=ladder.batch_sizes(16),
                          drop_remainder=True)
  step = jax.jit(lambda w, s, batch, mask: tx.update(
      dbj.gradient_stats(_loss, w, batch, mask)[1], s, w, stats=dbj.gradient_stats(_loss, w, batch, mask)[2]))
  w, state, seen = jnp.zeros(3), tx.init(jnp.zeros(3)), 0
  for epoch in range(3):
    b = dbj.current_batch_size(state, epoch=epoch)  # raises on drift
    for batch, mask in data.epoch_batches(arrays, b, ladder, drop_remainder=True):
      _, state = step(w, state, batch, mask)
      seen += int(mask.sum())
  s = dbj.find_state(state)
  assert (int(s.epoch), int(s.examples_seen)) == (3, seen) and seen < 3 * n
  assert int(s.batch_size) > 4
