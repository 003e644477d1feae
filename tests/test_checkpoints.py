"""Checkpoints: exact round trips, keep-last-N, and no half-written checkpoint ever loaded."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from divebatch_jax.train import checkpoints, models


def _training_state(seed):
  model = models.SmallCNN(1, 10, channels=(4,), norm="batch", rngs=nnx.Rngs(seed))
  _, params, rest = models.split_model(model)
  tx = optax.chain(
      optax.add_decayed_weights(5e-4),
      optax.sgd(optax.cosine_decay_schedule(0.1, 100), momentum=0.9),
  )
  opt_state = tx.init(params)
  keys = jax.random.split(jax.random.key(seed), 4)
  def perturb(x):  # non-trivial values everywhere, the int32 step count included
    if jnp.issubdtype(x.dtype, jnp.floating):
      return x + jax.random.normal(keys[0], x.shape, x.dtype)
    return x + 10 * seed + 3

  opt_state = jax.tree.map(perturb, opt_state)
  return {
      "params": params,
      "opt_state": opt_state,
      "rest": rest,
      "group_norm_rest": nnx.State({}),  # what split_model gives for norm="group" / "none"
      "bf16": jax.random.normal(keys[1], (33,), jnp.bfloat16),
      "int32": jax.random.randint(keys[2], (5, 3), -(2**31), 2**31 - 1, jnp.int32),
      "rng": keys[3],
      "host_array": np.arange(6, dtype=np.float32).reshape(2, 3) * seed,
  }


def _raw_bytes(x):
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x).tobytes()


def _assert_bitwise_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert _raw_bytes(a) == _raw_bytes(b)


def test_round_trip_is_bitwise_and_keeps_structure(tmp_path):
  state = _training_state(seed=1)
  host = {"epoch": 3, "sampler": {"position": 1280, "order_seed": 7}, "lr": float("nan"),
          "metrics": [{"epoch": 1, "test_accuracy": 0.5}]}
  path = checkpoints.save_checkpoint(tmp_path, 3, state, host)
  assert path == tmp_path / "step_00000003" and (path / checkpoints.COMMIT_MARKER).is_file()

  restored = checkpoints.restore_checkpoint(tmp_path, _training_state(seed=2))  # other values
  assert restored.step == 3
  _assert_bitwise_equal(restored.state, state)
  assert isinstance(restored.state["opt_state"][1][1], optax.ScaleByScheduleState)
  assert restored.state["opt_state"][1][1].count.dtype == jnp.int32
  assert np.isnan(restored.host.pop("lr"))
  assert restored.host == {k: v for k, v in host.items() if k != "lr"}


def test_restore_with_abstract_target(tmp_path):
  state = _training_state(seed=3)
  checkpoints.save_checkpoint(tmp_path, 0, state, {})
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), state)
  _assert_bitwise_equal(checkpoints.restore_checkpoint(tmp_path, abstract).state, state)


def test_keeps_the_newest_n(tmp_path):
  for step in range(1, 6):
    checkpoints.save_checkpoint(tmp_path, step, {"w": jnp.full((3,), step)}, {"step": step}, keep=2)
  assert checkpoints.committed_steps(tmp_path) == [4, 5]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]
  older = checkpoints.restore_checkpoint(tmp_path, {"w": jnp.zeros((3,), jnp.int32)}, step=4)
  assert older.host == {"step": 4} and np.all(older.state["w"] == 4)


def test_relative_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = checkpoints.save_checkpoint("ckpt", 2, {"w": jnp.arange(3)}, {"epoch": 2})
  assert path == tmp_path / "ckpt" / "step_00000002"
  ckpt = checkpoints.restore_checkpoint("ckpt", {"w": jnp.zeros(3, jnp.int32)})
  assert ckpt.step == 2 and np.all(ckpt.state["w"] == np.arange(3))


def test_fresh_directory_restores_nothing(tmp_path):
  assert checkpoints.restore_checkpoint(tmp_path / "absent", {"w": jnp.zeros(2)}) is None
  assert checkpoints.latest_step(tmp_path) is None


def _save_step(directory, step):
  return checkpoints.save_checkpoint(directory, step, {"w": jnp.full((4,), step)}, {"step": step})


def _restore_w(directory):
  ckpt = checkpoints.restore_checkpoint(directory, {"w": jnp.zeros((4,), jnp.int32)})
  assert ckpt.host == {"step": ckpt.step} and np.all(np.asarray(ckpt.state["w"]) == ckpt.step)
  return ckpt.step


def test_leftover_temporary_directory_is_never_loaded_and_is_cleaned(tmp_path):
  first = _save_step(tmp_path, 1)
  # An interrupted save of step 2: complete-looking content, not yet renamed.
  leftover = tmp_path / ".tmp-step_00000002-deadbeef"
  shutil.copytree(first, leftover)
  assert checkpoints.latest_step(tmp_path) == 1 and _restore_w(tmp_path) == 1
  _save_step(tmp_path, 2)
  assert not leftover.exists() and _restore_w(tmp_path) == 2


def test_step_directory_without_commit_marker_is_ignored(tmp_path):
  _save_step(tmp_path, 1)
  half = checkpoints.checkpoint_path(tmp_path, 2)
  shutil.copytree(checkpoints.checkpoint_path(tmp_path, 1), half)
  (half / checkpoints.COMMIT_MARKER).unlink()
  (half / checkpoints.HOST_FILE).write_text('{"step": 2, "trunc')
  assert checkpoints.committed_steps(tmp_path) == [1] and _restore_w(tmp_path) == 1
  with pytest.raises(ValueError, match="no committed checkpoint"):
    checkpoints.restore_checkpoint(tmp_path, {"w": jnp.zeros((4,), jnp.int32)}, step=2)


def test_save_failing_before_commit_keeps_previous(tmp_path, monkeypatch):
  _save_step(tmp_path, 1)
  real_write = checkpoints._write_synced

  def crash_on_marker(path, text):
    if path.name == checkpoints.COMMIT_MARKER:
      raise OSError("disk full (simulated)")
    real_write(path, text)

  monkeypatch.setattr(checkpoints, "_write_synced", crash_on_marker)
  with pytest.raises(OSError, match="simulated"):
    _save_step(tmp_path, 2)
  assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
  assert _restore_w(tmp_path) == 1
  monkeypatch.setattr(checkpoints, "_write_synced", real_write)
  _save_step(tmp_path, 2)
  assert _restore_w(tmp_path) == 2
  assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_saving_an_existing_step_replaces_it(tmp_path):
  checkpoints.save_checkpoint(tmp_path, 7, {"w": jnp.zeros(2)}, {"v": 1})
  checkpoints.save_checkpoint(tmp_path, 7, {"w": jnp.ones(2)}, {"v": 2})
  ckpt = checkpoints.restore_checkpoint(tmp_path, {"w": jnp.zeros(2)})
  assert ckpt.host == {"v": 2} and np.all(ckpt.state["w"] == 1)
  assert [p.name for p in tmp_path.iterdir()] == ["step_00000007"]


_SAVER = textwrap.dedent(
    """
    import sys, jax.numpy as jnp
    from divebatch_jax.train import checkpoints
    step = 0
    while True:
      step += 1
      checkpoints.save_checkpoint(sys.argv[1], step, {"w": jnp.full((4,), step)}, {"step": step},
                                  keep=2)
    """
)


def test_sigkill_during_saves_leaves_a_loadable_latest(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path)], stderr=subprocess.PIPE)
  try:
    deadline = time.monotonic() + 60
    while (checkpoints.latest_step(tmp_path) or 0) < 3:
      assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
      assert time.monotonic() < deadline, "the saver made no progress"
      time.sleep(0.02)
    time.sleep(np.random.default_rng().uniform(0.0, 0.2))
  finally:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  step = _restore_w(tmp_path)
  assert step >= 3 and step == checkpoints.latest_step(tmp_path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(step=-1), "step must be a non-negative int"),
        (dict(step=1.0), "step must be a non-negative int"),
        (dict(keep=0), "keep must be a positive int or None"),
        (dict(host={"x": object()}), "host must be JSON-serialisable"),
        (dict(host=[1]), "host must be a dict"),
    ],
)
def test_save_rejects_bad_arguments(tmp_path, kwargs, match):
  args = dict(step=1, host={}, keep=3) | kwargs
  with pytest.raises(ValueError, match=match):
    checkpoints.save_checkpoint(
        tmp_path, args["step"], {"w": jnp.zeros(2)}, args["host"], keep=args["keep"]
    )
  assert checkpoints.latest_step(tmp_path) is None


def test_restore_rejects_a_target_of_another_structure(tmp_path):
  checkpoints.save_checkpoint(tmp_path, 1, {"w": jnp.zeros(2), "b": jnp.zeros(3)}, {})
  with pytest.raises(ValueError, match="does not match the target"):
    checkpoints.restore_checkpoint(tmp_path, {"w": jnp.zeros(2)})
