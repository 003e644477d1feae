"""Checkpoints: exact round trips, keep-last-N, no half-written, damaged or diverged checkpoint ever loaded."""

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import CHECKPOINT_DAMAGE, delete_orbax_metadata, empty_host_json, flip_array_byte, truncate_array_data
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
    deadline = time.monotonic() + 1800  # no progress at all, not slow progress, fails
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


# ------------------------------------------------------------------ integrity


def _weights(step):
  return np.random.default_rng(step).standard_normal(4096).astype(np.float32)


def _big_state(step):
  """Incompressible weights: their bytes are the checkpoint's largest data file."""
  return {"w": jnp.asarray(_weights(step)), "count": jnp.int32(step)}


def _restore_big(directory, **kwargs):
  return checkpoints.restore_checkpoint(directory, _big_state(0), **kwargs)


def _files(checkpoint):
  return {p.relative_to(checkpoint).as_posix(): p for p in checkpoint.rglob("*") if p.is_file()}


def test_manifest_records_every_file_and_the_marker_records_the_manifest(tmp_path):
  path = checkpoints.save_checkpoint(tmp_path, 1, _big_state(1), {"epoch": 1})
  files = _files(path)
  manifest = json.loads((path / checkpoints.MANIFEST_FILE).read_text())
  listed = set(files) - {checkpoints.MANIFEST_FILE, checkpoints.COMMIT_MARKER}
  assert set(manifest["files"]) == listed and checkpoints.HOST_FILE in listed
  assert any(name.startswith("state/") for name in listed)
  for name in listed:  # reference: hashlib over the bytes on disk
    data = files[name].read_bytes()
    assert manifest["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
  marker = json.loads((path / checkpoints.COMMIT_MARKER).read_text())
  assert marker == {
      "step": 1,
      "manifest_sha256": hashlib.sha256((path / checkpoints.MANIFEST_FILE).read_bytes()).hexdigest(),
  }
  assert checkpoints.verify_checkpoint(path) is None


@pytest.mark.parametrize("case", list(CHECKPOINT_DAMAGE))
def test_damaged_newest_checkpoint_is_named_skipped_and_the_previous_restored(tmp_path, case, caplog):
  damage, problem = CHECKPOINT_DAMAGE[case]
  for step in (1, 2, 3):
    checkpoints.save_checkpoint(tmp_path, step, _big_state(step), {"epoch": step}, keep=None)
  newest = checkpoints.checkpoint_path(tmp_path, 3)
  damage(newest)
  assert checkpoints.committed_steps(tmp_path) == [1, 2, 3]  # still looks committed
  assert problem in checkpoints.verify_checkpoint(newest)
  with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
    ckpt = _restore_big(tmp_path)
  assert ckpt.step == 2 and ckpt.host == {"epoch": 2}
  assert np.array_equal(ckpt.state["w"], _weights(2)) and int(ckpt.state["count"]) == 2
  (line,) = ckpt.skipped
  assert "\n" not in line and str(newest) in line and problem in line and "restoring step 2" in line
  assert [r.getMessage() for r in caplog.records] == [line]
  with pytest.raises(checkpoints.DamagedCheckpointError, match=problem):
    _restore_big(tmp_path, step=3)


def test_flipped_byte_would_restore_wrong_values_without_the_check(tmp_path):
  """Reference for the byte-flip case: orbax alone reads the damaged file without complaint."""
  path = checkpoints.save_checkpoint(tmp_path, 5, _big_state(5), {})
  flip_array_byte(path)
  raw = ocp.StandardCheckpointer().restore(path / checkpoints.STATE_DIR, _big_state(0))
  assert not np.array_equal(raw["w"], _weights(5))
  with pytest.raises(checkpoints.DamagedCheckpointError, match="no intact checkpoint"):
    _restore_big(tmp_path)


def test_walks_back_over_several_damaged_checkpoints(tmp_path):
  for step in (1, 2, 3, 4):
    checkpoints.save_checkpoint(tmp_path, step, _big_state(step), {"epoch": step}, keep=None)
  truncate_array_data(checkpoints.checkpoint_path(tmp_path, 4))
  empty_host_json(checkpoints.checkpoint_path(tmp_path, 3))
  ckpt = _restore_big(tmp_path)
  assert ckpt.step == 2 and np.array_equal(ckpt.state["w"], _weights(2))
  assert ["step_00000004" in ckpt.skipped[0], "step_00000003" in ckpt.skipped[1]] == [True, True]


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path):
  for step in (1, 2):
    checkpoints.save_checkpoint(tmp_path, step, _big_state(step), {}, keep=None)
    flip_array_byte(checkpoints.checkpoint_path(tmp_path, step))
  with pytest.raises(checkpoints.DamagedCheckpointError) as info:
    _restore_big(tmp_path)
  message = str(info.value)
  assert "\n" not in message and "no intact checkpoint" in message
  assert "step_00000001" in message and "step_00000002" in message and "Remove" in message


def test_checkpoint_without_manifest_counts_as_damaged(tmp_path):
  """A checkpoint saved before checksums existed (marker without the manifest's sha256)."""
  checkpoints.save_checkpoint(tmp_path, 1, _big_state(1), {}, keep=None)
  old = checkpoints.save_checkpoint(tmp_path, 2, _big_state(2), {}, keep=None)
  (old / checkpoints.MANIFEST_FILE).unlink()
  (old / checkpoints.COMMIT_MARKER).write_text(json.dumps({"step": 2}))
  assert "names no manifest checksum" in checkpoints.verify_checkpoint(old)
  assert _restore_big(tmp_path).step == 1


# ------------------------------------------------------------------ non-finite states


@pytest.mark.parametrize(
    "poison, leaf",
    [
        (lambda s: s | {"params": s["params"] | {"b": jnp.array([0.0, jnp.nan])}}, "['params']['b']"),
        (lambda s: s | {"opt": optax.TraceState(trace=jnp.array([jnp.inf]))}, "['opt'].trace"),
        (lambda s: s | {"bf16": jnp.array([-jnp.inf], jnp.bfloat16)}, "['bf16']"),
        (lambda s: s | {"host": np.array([1.0, np.nan])}, "['host']"),
    ],
)
def test_non_finite_state_is_refused_and_nothing_written(tmp_path, poison, leaf):
  state = {
      "params": {"b": jnp.zeros(2)}, "opt": optax.TraceState(trace=jnp.zeros(1)),
      "bf16": jnp.zeros(1, jnp.bfloat16), "host": np.zeros(2), "count": jnp.int32(2**31 - 1),
      "key": jax.random.key(0),
  }
  assert checkpoints.first_non_finite_leaf(state) is None  # ints and PRNG keys are not checked
  checkpoints.save_checkpoint(tmp_path, 1, state, {"epoch": 1})
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  with pytest.raises(ValueError, match="refusing to save checkpoint step 2") as info:
    checkpoints.save_checkpoint(tmp_path, 2, poison(state), {"epoch": 2})
  assert leaf in str(info.value) and "NaN or inf" in str(info.value)
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
  assert not (tmp_path / "fresh").exists()
  with pytest.raises(ValueError, match="NaN or inf"):
    checkpoints.save_checkpoint(tmp_path / "fresh", 0, poison(state), {})
  assert not (tmp_path / "fresh").exists()


# ------------------------------------------------------------------ retention


def test_retention_keeps_the_checkpoint_just_written_when_newer_ones_are_damaged(tmp_path):
  """Resumed from step 4 because 5 and 6 are damaged: saving step 5 with keep=1 keeps it."""
  for step in (4, 5, 6):
    checkpoints.save_checkpoint(tmp_path, step, _big_state(step), {"epoch": step}, keep=None)
  flip_array_byte(checkpoints.checkpoint_path(tmp_path, 5))
  delete_orbax_metadata(checkpoints.checkpoint_path(tmp_path, 6))
  assert _restore_big(tmp_path).step == 4
  checkpoints.save_checkpoint(tmp_path, 5, _big_state(5), {"epoch": 5}, keep=1)
  assert checkpoints.committed_steps(tmp_path) == [5, 6]  # 4 removed, the new 5 kept
  ckpt = _restore_big(tmp_path)
  assert ckpt.step == 5 and np.array_equal(ckpt.state["w"], _weights(5)) and len(ckpt.skipped) == 1


# ------------------------------------------------------------------ several processes

_TWO_PROCESS = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from divebatch_jax.train import checkpoints

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    by_rows = NamedSharding(mesh, PartitionSpec("data"))
    me = jax.process_index()

    def state(step, poison=False):
      w = np.arange(12, dtype=np.float32).reshape(3, 4) * step
      mine = np.arange(4, dtype=np.float32)[None] + 10 * me + step   # only this process's row
      if poison and me == 1:   # one process holds the NaN; both must refuse
        mine[0, 0] = np.nan
      return {"w": jax.make_array_from_process_local_data(replicated, w),
              "rows": jax.make_array_from_process_local_data(by_rows, mine, (2, 4)),
              "count": jax.make_array_from_process_local_data(replicated, np.int32(7 * step))}

    def restored():
      ck = checkpoints.restore_checkpoint(sys.argv[3], state(0))
      return {"step": ck.step, "host": ck.host, "skipped": len(ck.skipped),
              "w": np.asarray(ck.state["w"].addressable_data(0)).tolist(),
              "row": np.asarray(ck.state["rows"].addressable_data(0)).tolist(),
              "count": int(ck.state["count"].addressable_data(0))}

    for step in (1, 2, 3):
      checkpoints.save_checkpoint(sys.argv[3], step, state(step), {"epoch": step}, keep=2)
    result = {"latest": restored(), "steps": checkpoints.committed_steps(sys.argv[3])}
    try:
      checkpoints.save_checkpoint(sys.argv[3], 4, state(4, poison=True), {"epoch": 4})
    except ValueError as err:
      result["refused"] = str(err)
    if me == 0:   # damage process 1's part of step 3
      part = sorted(p for p in (checkpoints.checkpoint_path(sys.argv[3], 3) / "state").rglob("*")
                    if p.is_file() and "process_1" in str(p))[-1]
      part.write_bytes(part.read_bytes()[:-1])
    multihost_utils.sync_global_devices("damaged")
    result["after_damage"] = restored()
    print(json.dumps(result))
    """
)


def test_two_processes_save_and_restore_their_parts(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  root = Path(__file__).resolve().parents[1]
  procs = [
      subprocess.Popen(
          [sys.executable, "-c", _TWO_PROCESS, f"127.0.0.1:{port}", str(pid), str(tmp_path / "ckpt")],
          cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      )
      for pid in (0, 1)
  ]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  results = []
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  w = lambda step: (np.arange(12).reshape(3, 4) * step).tolist()
  for me, result in enumerate(results):
    assert result["steps"] == [2, 3]
    assert result["latest"] == {"step": 3, "host": {"epoch": 3}, "skipped": 0, "w": w(3),
                                "row": [[10 * me + 3 + i for i in range(4)]], "count": 21}
    assert "refusing to save checkpoint step 4" in result["refused"] and "['rows']" in result["refused"]
    after = result["after_damage"]
    assert (after["step"], after["w"], after["count"]) == (2, w(2), 14)
    assert after["row"] == [[10 * me + 2 + i for i in range(4)]]
  assert [r["after_damage"]["skipped"] for r in results] == [1, 0]  # process 0 checks the files
  manifest = json.loads((tmp_path / "ckpt" / "step_00000002" / checkpoints.MANIFEST_FILE).read_text())
  assert any("process_1" in name for name in manifest["files"])


def test_adaptive_batch_bookkeeping_may_hold_nan_but_its_inner_optimizer_may_not(tmp_path):
  import divebatch_jax as dbj  # pylint: disable=g-import-not-at-top
  from divebatch_jax import policies  # pylint: disable=g-import-not-at-top

  params = {"w": jnp.ones(3)}
  tx = dbj.adaptive_batch(optax.sgd(0.1, momentum=0.9), policies.constant(), num_examples=100, base_batch_size=10)
  opt_state = tx.init(params)
  assert np.isnan(opt_state.statistic)  # "not measured yet", by design
  checkpoints.save_checkpoint(tmp_path, 1, {"params": params, "opt_state": opt_state}, {})
  restored = checkpoints.restore_checkpoint(tmp_path, {"params": params, "opt_state": opt_state})
  assert np.isnan(restored.state["opt_state"].statistic)
  momentum = opt_state.inner_state[0]._replace(trace={"w": jnp.array([0.0, jnp.nan, 0.0])})
  diverged = opt_state._replace(inner_state=(momentum,) + tuple(opt_state.inner_state[1:]))
  with pytest.raises(ValueError, match=r"\['opt_state'\]\.inner_state\[0\]\.trace\['w'\] holds NaN or inf"):
    checkpoints.save_checkpoint(tmp_path, 2, {"params": params, "opt_state": diverged}, {})
  assert checkpoints.committed_steps(tmp_path) == [1]


def test_retention_spares_a_newer_intact_checkpoint_when_an_older_step_is_saved(tmp_path):
  """keep=1, steps 5, 6, 7 with 7 damaged: re-saving step 5 must not remove 6, the newest intact one."""
  for step in (5, 6, 7):
    checkpoints.save_checkpoint(tmp_path, step, _big_state(step), {"epoch": step}, keep=None)
  truncate_array_data(checkpoints.checkpoint_path(tmp_path, 7))
  checkpoints.save_checkpoint(tmp_path, 5, _big_state(5), {"epoch": 5}, keep=1)
  assert checkpoints.committed_steps(tmp_path) == [5, 6, 7]
  assert _restore_big(tmp_path).step == 6
  truncate_array_data(checkpoints.checkpoint_path(tmp_path, 6))  # now 5 is the newest intact: 6 may go
  checkpoints.save_checkpoint(tmp_path, 5, _big_state(5), {"epoch": 5}, keep=1)
  assert checkpoints.committed_steps(tmp_path) == [5, 7]
  ckpt = _restore_big(tmp_path)
  assert ckpt.step == 5 and np.array_equal(ckpt.state["w"], _weights(5))
