"""Faults, reproduced through the CLI and the library: each gives one clear line, or is survived.

Damaged checkpoints, bad npz files, resuming with changed settings, batches larger
than the data, bad devices and paths, divergence. Tests marked
``xfail(reason="needs loop integration")`` describe behaviour that needs
``train/loop.py`` to call the new functions (see the report of issue 13).
"""

import dataclasses
import json
import os

import numpy as np
import pytest

from conftest import CHECKPOINT_DAMAGE, flip_array_byte, run_records
from divebatch_jax.train import checkpoints, cli, config as config_lib, loop, main, metrics, resume
from divebatch_jax.train.config import ConfigError, TrainConfig

TINY = [
    "--dataset", "synthetic", "--num-examples", "300", "--num-test-examples", "100",
    "--model", "logreg", "--method", "sgd", "--batch-size", "8", "--max-batch-size", "64",
    "--device-batch", "64",  # pinned: runs are compared, and a measured m follows the machine's load
]
TIMING_FIELDS = {"train_time_s", "eval_time_s", "compilations", "compile_s"}


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
  return err


# ------------------------------------------------------------------ damaged checkpoints


def _train(out, *extra, epochs=3):
  assert main(TINY + ["--out", str(out), "--epochs", str(epochs), "--checkpoint-every", "1", *extra]) == 0


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A 3-epoch CLI run with a checkpoint after every epoch (steps 1, 2, 3 kept)."""
  out = tmp_path_factory.mktemp("trained") / "run"
  _train(out)
  return out


def _copy_run(src, dst):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dst)
  return dst


@pytest.mark.parametrize("case", list(CHECKPOINT_DAMAGE))
def test_damage_to_a_cli_checkpoint_is_detected(trained_run, tmp_path, case):
  run = _copy_run(trained_run, tmp_path / "run")
  ckpt_dir = run / resume.CHECKPOINTS_DIR
  assert checkpoints.committed_steps(ckpt_dir) == [1, 2, 3]
  assert all(checkpoints.verify_checkpoint(checkpoints.checkpoint_path(ckpt_dir, s)) is None for s in (1, 2, 3))
  damage, expected = CHECKPOINT_DAMAGE[case]
  damage(checkpoints.checkpoint_path(ckpt_dir, 3))
  problem = checkpoints.verify_checkpoint(checkpoints.checkpoint_path(ckpt_dir, 3))
  assert problem is not None and expected in problem and "\n" not in problem
  assert checkpoints.verify_checkpoint(checkpoints.checkpoint_path(ckpt_dir, 2)) is None


def test_resume_with_every_checkpoint_damaged_is_one_line(trained_run, tmp_path, capsys):
  run = _copy_run(trained_run, tmp_path / "run")
  for step in (1, 2, 3):
    flip_array_byte(checkpoints.checkpoint_path(run / resume.CHECKPOINTS_DIR, step))
  assert main(TINY + ["--out", str(run), "--epochs", "4", "--checkpoint-every", "1", "--resume"]) == 2
  err = _one_error_line(capsys)
  assert "no intact checkpoint" in err and "step_00000003" in err and "step_00000001" in err


@pytest.mark.parametrize("case", ["flipped byte in array data", "empty host.json"])
def test_resume_skips_a_damaged_checkpoint_and_equals_the_uninterrupted_run(trained_run, tmp_path, capsys, case):
  run = _copy_run(trained_run, tmp_path / "run")
  newest = checkpoints.checkpoint_path(run / resume.CHECKPOINTS_DIR, 3)
  CHECKPOINT_DAMAGE[case].apply(newest)
  capsys.readouterr()
  assert main(TINY + ["--out", str(run), "--epochs", "4", "--checkpoint-every", "1", "--resume"]) == 0
  out = capsys.readouterr()
  damaged_lines = [line for line in (out.out + out.err).splitlines() if str(newest) in line]
  assert len(damaged_lines) == 1 and "damaged" in damaged_lines[0]  # echoed by the loop
  assert "at epoch 2" in out.out
  _train(tmp_path / "reference", epochs=4)
  reference, got = run_records(tmp_path / "reference"), run_records(run)
  assert [r["epoch"] for r in got] == [1, 2, 3, 4]
  for a, b in zip(reference, got):
    assert {k: v for k, v in a.items() if k not in TIMING_FIELDS} == {k: v for k, v in b.items() if k not in TIMING_FIELDS}


# ------------------------------------------------------------------ bad npz files


def _arrays(**changes):
  rng = np.random.default_rng(0)
  base = dict(
      x_train=rng.normal(size=(60, 6)).astype(np.float32), y_train=rng.integers(0, 3, 60),
      x_test=rng.normal(size=(20, 6)).astype(np.float32), y_test=rng.integers(0, 3, 20),
  )
  return {k: v for k, v in (base | changes).items() if v is not None}


def _npz(path, **changes):
  np.savez(path, **_arrays(**changes))
  return path


NPZ_ARGS = ["--model", "logreg", "--method", "sgd", "--epochs", "1", "--batch-size", "8", "--max-batch-size", "16"]


def test_good_npz_trains_with_an_inferred_class_count(tmp_path, capsys):
  path = _npz(tmp_path / "good.npz")
  assert main(["--dataset", f"npz:{path}", *NPZ_ARGS, "--out", str(tmp_path / "run")]) == 0
  assert run_records(tmp_path / "run")[0]["examples"] == 60


BAD_NPZ_CLI = {
    "missing key": (dict(y_test=None), "lacks the key(s) ['y_test']"),
    "float labels": (dict(y_train=np.ones(60)), "key 'y_train' must hold integer class labels"),
    "negative labels": (dict(y_test=np.full(20, -2)), "key 'y_test' holds the negative label -2"),
    "label beyond the stated count": (dict(num_classes=np.int64(2), y_train=np.arange(60) % 3), "key 'y_train' holds the label 2, outside [0, 2)"),
    "NaN features": (dict(x_test=np.full((20, 6), np.nan, np.float32)), "key 'x_test' holds 120 NaN/inf value(s)"),
    "length mismatch": (dict(y_train=np.zeros(59, int)), "key 'y_train' has 59 labels for the 60 rows"),
    "no test rows": (dict(x_test=np.zeros((0, 6), np.float32), y_test=np.zeros(0, int)), "key 'x_test' has no rows"),
    "feature shapes differ": (dict(x_test=np.zeros((20, 5), np.float32)), "x_train examples have shape (6,) but x_test examples have (5,)"),
    "a label of 10**9": (dict(y_train=np.full(60, 10**9)), "key 'y_train' holds the label 1000000000, which makes 1000000001 classes"),
    "a stated count of 10**9": (dict(num_classes=np.int64(10**9)), "key 'num_classes' is 1,000,000,000"),
    "1-D features": (dict(x_train=np.zeros(60, np.float32), x_test=np.zeros(20, np.float32)), "key 'x_train' has shape (60,): each example needs a feature axis"),
}


@pytest.mark.parametrize("case", list(BAD_NPZ_CLI))
def test_bad_npz_is_one_line_and_exit_2(tmp_path, capsys, case):
  changes, needle = BAD_NPZ_CLI[case]
  path = _npz(tmp_path / "bad.npz", **changes)
  assert main(["--dataset", f"npz:{path}", *NPZ_ARGS, "--out", str(tmp_path / "run")]) == 2
  err = _one_error_line(capsys)
  assert needle in err and str(path) in err


@pytest.mark.parametrize(
    "content, needle",
    [(b"not a zip at all", "is not an .npz archive"), (b"", "is not an .npz archive"), (None, "does not exist")],
)
def test_unreadable_npz_is_one_line_and_exit_2(tmp_path, capsys, content, needle):
  path = tmp_path / "data.npz"
  if content is not None:
    path.write_bytes(content)
  assert main(["--dataset", f"npz:{path}", *NPZ_ARGS, "--out", str(tmp_path / "run")]) == 2
  err = _one_error_line(capsys)
  assert needle in err and str(path) in err and "pickle" not in err


# ------------------------------------------------------------------ resume with changed settings


def test_fields_are_split_into_trajectory_and_harmless():
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  assert set(resume.TRAJECTORY_FIELDS) | set(resume.HARMLESS_FIELDS) == fields
  assert not set(resume.TRAJECTORY_FIELDS) & set(resume.HARMLESS_FIELDS)
  assert set(resume.HARMLESS_FIELDS) == {
      "epochs", "out", "resume", "progress", "checkpoint_every", "eval_batch_size", "data_dir",
      "tensorboard", "compilation_cache",
  }
  flags = {a.dest for a in cli._train_parser()._actions}
  assert fields <= flags  # every field has a flag, so a refused resume names one


def _changed(value):
  """A different value of the same kind, for every field type of TrainConfig."""
  if isinstance(value, bool) or value is None:
    return True if value is not True else False
  if isinstance(value, (int, float)):
    return value * 2 + 1
  if isinstance(value, tuple):
    return value + (7,)
  return value + "x" if value != "1" else "2"


@pytest.mark.parametrize("field", resume.TRAJECTORY_FIELDS)
def test_changing_a_trajectory_setting_is_refused_naming_it(field):
  stored = TrainConfig(schedule="multistep", schedule_milestones=(3,))
  new = stored.replace(**{field: _changed(getattr(stored, field))}, resume=True)
  stored_json = json.loads(json.dumps(dataclasses.asdict(stored)))
  with pytest.raises(ConfigError) as info:
    resume.check_resume(stored_json, new)
  message = str(info.value)
  assert "\n" not in message
  assert config_lib.flag_name(field) in message
  assert f"was {stored_json[field]!r} in the stored run, now" in message


def test_harmless_changes_are_allowed_and_noted():
  stored = TrainConfig()
  new = stored.replace(epochs=40, out="elsewhere", resume=True, progress=True, checkpoint_every=1,
                       eval_batch_size=10, data_dir="/data")
  notes = resume.check_resume(json.loads(json.dumps(dataclasses.asdict(stored))), new)
  assert len(notes) == 6 and all(n.startswith("--resume: --") for n in notes)  # resume itself not noted
  assert "--resume: --epochs changed from 30 to 40 (the trajectory so far is unchanged)." in notes
  assert "--resume: --data-dir changed from None to '/data' (the trajectory so far is unchanged)." in notes
  assert resume.check_resume(json.loads(json.dumps(dataclasses.asdict(stored))), stored) == []


def test_epochs_change_the_cosine_schedule_and_are_then_refused():
  stored = TrainConfig(schedule="cosine")
  with pytest.raises(ConfigError, match=r"--resume: --epochs was 30 in the stored run, now 40 \(the cosine schedule's period\)\. That"):
    resume.check_resume(dataclasses.asdict(stored), stored.replace(epochs=40))


def test_stored_config_from_another_version():
  stored = dataclasses.asdict(TrainConfig())
  del stored["estimator"]  # a setting added later: the stored run used the default
  stored["old_flag"] = 1
  assert resume.check_resume(stored, TrainConfig()) == [
      "--resume: the stored config.json has the setting 'old_flag', which this version does not know; ignored."
  ]
  with pytest.raises(ConfigError, match="--estimator was 'epoch' in the stored run, now 'ema'"):
    resume.check_resume(stored, TrainConfig(estimator="ema"))


def test_cli_resume_with_a_changed_trajectory_flag_is_refused(tmp_path, capsys):
  out = tmp_path / "run"
  _train(out, epochs=2)
  before = (out / metrics.METRICS_FILE).read_text()
  assert main(TINY + ["--out", str(out), "--epochs", "3", "--resume", "--lr", "0.2"]) == 2
  err = _one_error_line(capsys)
  assert "--lr was 0.05 in the stored run, now 0.2" in err
  assert (out / metrics.METRICS_FILE).read_text() == before


def test_cli_resume_with_more_epochs_continues(tmp_path, capsys):
  out = tmp_path / "run"
  _train(out, epochs=2)
  capsys.readouterr()
  assert main(TINY + ["--out", str(out), "--epochs", "3", "--checkpoint-every", "1", "--resume"]) == 0
  printed = capsys.readouterr().out
  assert "--resume: --epochs changed from 2 to 3" in printed
  assert [r["epoch"] for r in run_records(out)] == [1, 2, 3]


def test_cli_resume_with_an_unreadable_config_json(tmp_path, capsys):
  out = tmp_path / "run"
  _train(out, epochs=1)
  (out / resume.CONFIG_FILE).write_text("{truncated")
  assert main(TINY + ["--out", str(out), "--epochs", "2", "--resume"]) == 2
  assert "config.json is not valid JSON" in _one_error_line(capsys)


# ------------------------------------------------------------------ what blocks a retry


def test_run_exists_only_with_a_finished_epoch_or_a_checkpoint(tmp_path):
  out = tmp_path / "run"
  assert not resume.run_exists(out)
  out.mkdir()
  (out / resume.CONFIG_FILE).write_text("{}")
  (out / metrics.METRICS_FILE).write_text("")
  assert not resume.run_exists(out)
  (out / metrics.METRICS_FILE).write_text('{"epoch": 1, "batch_')  # killed while writing epoch 1
  assert not resume.run_exists(out)
  (out / resume.CHECKPOINTS_DIR / ".tmp-step_00000001").mkdir(parents=True)  # a save killed half-way
  assert not resume.run_exists(out)
  (out / metrics.METRICS_FILE).write_text('{"epoch": 1}\n')
  assert resume.run_exists(out)
  (out / metrics.METRICS_FILE).unlink()
  checkpoints.save_checkpoint(out / resume.CHECKPOINTS_DIR, 1, {"w": np.zeros(2)}, {})
  assert resume.run_exists(out)
  with pytest.raises(FileExistsError, match="pass --resume"):
    resume.check_out_dir(out, TrainConfig(out=str(out)))


def test_existing_run_is_still_refused_without_resume(tmp_path, capsys):
  out = tmp_path / "run"
  _train(out, epochs=1)
  assert main(TINY + ["--out", str(out), "--epochs", "1"]) == 2
  assert "--resume" in _one_error_line(capsys)


def test_a_run_that_failed_before_its_first_epoch_does_not_block_a_retry(tmp_path, capsys, monkeypatch):
  out = tmp_path / "run"

  def fail(*args, **kwargs):
    raise ConfigError("evaluation failed (simulated)")  # a user error: exit 2, one line

  with monkeypatch.context() as patch:
    patch.setattr(loop, "_evaluate", fail)
    assert main(TINY + ["--out", str(out), "--epochs", "1"]) == 2
  assert "simulated" in _one_error_line(capsys)
  assert not resume.run_exists(out)
  assert main(TINY + ["--out", str(out), "--epochs", "1"]) == 0


# ------------------------------------------------------------------ batch larger than the data


def test_validate_against_data():
  config = TrainConfig(batch_size=16, max_batch_size=512, max_device_batch=400)
  clamped, notes = config_lib.validate_against_data(config, 300)
  assert (clamped.max_batch_size, clamped.max_device_batch, clamped.batch_size) == (300, 300, 16)
  assert notes == [
      "--max-batch-size 512 is larger than the training set (n = 300 examples); using 300.",
      "--max-device-batch 400 is larger than the training set (n = 300 examples); using 300.",
  ]
  assert config_lib.validate_against_data(config, 512) == (config, [])
  with pytest.raises(ConfigError, match=r"--batch-size \(16\) must be <= the training set size \(n = 15 examples\)"):
    config_lib.validate_against_data(config, 15)


def test_cli_batch_size_above_num_examples_is_refused_up_front(tmp_path, capsys):
  assert main(TINY + ["--batch-size", "400", "--max-batch-size", "512", "--out", str(tmp_path / "run")]) == 2
  err = _one_error_line(capsys)
  assert "--batch-size (400) must be <= --num-examples (300)" in err
  assert not (tmp_path / "run").exists()


def test_cli_batch_size_above_the_loaded_data_names_the_flag_and_n(tmp_path, capsys):
  """digits has n = 1438 training examples, known only once loaded."""
  args = ["--dataset", "digits", "--model", "logreg", "--method", "sgd", "--epochs", "1"]
  assert main(args + ["--batch-size", "2000", "--max-batch-size", "4096", "--out", str(tmp_path / "a")]) == 2
  err = _one_error_line(capsys)
  assert "--batch-size (2000)" in err and "n = 1438" in err


def test_cli_max_batch_size_above_the_loaded_data_is_clamped_with_a_note(tmp_path, capsys):
  args = ["--dataset", "digits", "--model", "logreg", "--method", "adabatch", "--epochs", "2", "--growth-every", "1",
          "--growth-factor", "1024", "--no-round-batch"]  # the rule's own value, clamped to n
  assert main(args + ["--batch-size", "16", "--max-batch-size", "4096", "--out", str(tmp_path / "a")]) == 0
  assert "--max-batch-size 4096 is larger than the training set (n = 1438 examples); using 1438." in capsys.readouterr().out
  assert [r["batch_size"] for r in run_records(tmp_path / "a")] == [16, 1438]


def test_a_clamped_run_resumes_with_the_same_flags(tmp_path, capsys):
  """config.json records the flags as given, so the clamp does not read as a changed flag."""
  args = ["--dataset", "digits", "--model", "logreg", "--method", "sgd", "--batch-size", "512",
          "--max-batch-size", "4096", "--checkpoint-every", "1", "--out", str(tmp_path / "a")]
  assert main(args + ["--epochs", "1"]) == 0
  assert main(args + ["--epochs", "2", "--resume"]) == 0
  assert "resumed from" in capsys.readouterr().out
  assert [r["epoch"] for r in run_records(tmp_path / "a")] == [1, 2]


# ------------------------------------------------------------------ devices, paths, bugs


def test_more_devices_than_exist_is_one_line(tmp_path, capsys):
  assert main(TINY + ["--devices", "3", "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
  err = _one_error_line(capsys)
  assert err.startswith("error: --devices 3:") and "[1, 1]" in err


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
  blocker = tmp_path / "file.txt"
  blocker.write_text("x")
  assert main(TINY + ["--epochs", "1", "--out", str(blocker)]) == 2
  assert str(blocker) in _one_error_line(capsys)
  assert main(TINY + ["--epochs", "1", "--out", str(blocker / "run")]) == 2
  assert str(blocker) in _one_error_line(capsys)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_one_line(tmp_path, capsys):
  parent = tmp_path / "ro"
  parent.mkdir()
  parent.chmod(0o500)
  try:
    assert main(TINY + ["--epochs", "1", "--out", str(parent / "run")]) == 2
    assert "Permission denied" in _one_error_line(capsys)
  finally:
    parent.chmod(0o700)


def test_permission_error_is_one_line(tmp_path, capsys, monkeypatch):
  """The same path as a read-only --out (which root, running these tests here, cannot hit)."""
  def denied(config, **kwargs):
    raise PermissionError(13, "Permission denied", config.out)

  monkeypatch.setattr(loop, "train_and_evaluate", denied)
  assert main(TINY + ["--epochs", "1", "--out", str(tmp_path / "run")]) == 2
  assert f"Permission denied: '{tmp_path / 'run'}'" in _one_error_line(capsys)


@pytest.mark.parametrize("bug", [RuntimeError, KeyError, TypeError, ValueError])
def test_internal_errors_keep_their_traceback(tmp_path, monkeypatch, bug):
  def broken(config, **kwargs):
    raise bug("a bug, not a user error")

  monkeypatch.setattr(loop, "train_and_evaluate", broken)
  with pytest.raises(bug):
    main(TINY + ["--epochs", "1", "--out", str(tmp_path / "run")])


# ------------------------------------------------------------------ divergence


def _strict_loads(text):
  def refuse(token):
    raise ValueError(token)
  return json.loads(text, parse_constant=refuse)


def test_divergence_stops_the_run_and_is_recorded(tmp_path, capsys):
  out = tmp_path / "run"
  assert main(TINY + ["--lr", "1e6", "--epochs", "3", "--checkpoint-every", "1", "--out", str(out)]) == 1
  printed = capsys.readouterr().out
  assert "epoch 1: train_loss is nan" in printed and "div ep 1" in printed
  summary = _strict_loads((out / metrics.SUMMARY_FILE).read_text())
  assert summary["diverged_at_epoch"] == 1 and summary["first_within_epoch"] is None
  assert [_strict_loads(line) for line in (out / metrics.METRICS_FILE).read_text().splitlines()] == []
  assert checkpoints.committed_steps(out / resume.CHECKPOINTS_DIR) == []


# --------------------------------------------------------------------------- library calls


def _linear_loss(w, batch):
  return 0.5 * (batch["x"] @ w - batch["y"]) ** 2


def _library_batch(rows=6):
  import jax.numpy as jnp

  x = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) / 10
  return jnp.zeros(3), {"x": jnp.asarray(x), "y": jnp.asarray(x.sum(1))}


@pytest.mark.parametrize("method", ["exact", "ghost", "microbatch", "auto"])
@pytest.mark.parametrize(
    "loss, shape",
    [(lambda w, b: _linear_loss(w, b).mean(), "()"), (lambda w, b: _linear_loss(w, b)[:, None], r"\(6, 1\)")],
    ids=["scalar", "column"],
)
def test_a_loss_that_is_not_per_example_gets_the_same_message_from_every_method(method, loss, shape):
  import divebatch_jax as dbj

  params, batch = _library_batch()
  with pytest.raises(ValueError, match=rf"per-example losses of shape \(6,\) .* got shape {shape}"):
    dbj.gradient_stats(loss, params, batch, method=method)


def test_library_arguments_out_of_range_are_named():
  import jax.numpy as jnp
  import optax

  import divebatch_jax as dbj
  from divebatch_jax import policies

  params, batch = _library_batch()
  with pytest.raises(ValueError, match="at least one row"):
    dbj.gradient_stats(_linear_loss, params, {"x": jnp.zeros((0, 3)), "y": jnp.zeros(0)})
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    dbj.gradient_stats(_linear_loss, params, batch, chunk_size=True)
  with pytest.raises(ValueError, match=r"mask has shape \(2, 3\).*accumulate_gradients"):
    dbj.gradient_stats(_linear_loss, params, batch, np.ones((2, 3), bool))
  with pytest.raises(ValueError, match=r"base_batch_size must be in \[1, 32\]"):
    dbj.adaptive_batch(optax.sgd(0.1), policies.divebatch(0.1, 32), num_examples=100, base_batch_size=64)
  with pytest.raises(ValueError, match=r"base_batch_size must be in \[1, 20\]"):
    dbj.adaptive_batch(optax.sgd(0.1), policies.divebatch(0.1, 32), num_examples=20, base_batch_size=25)
  with pytest.raises(ValueError, match="delta must be a finite number"):
    policies.divebatch(float("inf"), 32)
  with pytest.raises(ValueError, match="finite"):
    dbj.suggest_delta(128, 1000, float("inf"))


def test_the_microbatch_method_honours_the_mask():
  """Padded rows with garbage change neither the loss nor the statistics of method='microbatch'."""
  import jax.numpy as jnp

  import divebatch_jax as dbj

  params, batch = _library_batch(8)
  mask = np.arange(8) < 6
  garbage = {k: jnp.where(jnp.asarray(mask).reshape((8,) + (1,) * (v.ndim - 1)), v, 1e3) for k, v in batch.items()}
  clean = dbj.gradient_stats(_linear_loss, params, batch, mask, method="microbatch", chunk_size=2)
  dirty = dbj.gradient_stats(_linear_loss, params, garbage, mask, method="microbatch", chunk_size=2)
  real = dbj.gradient_stats(_linear_loss, params, {k: v[:6] for k, v in batch.items()}, method="exact")
  assert float(clean[0]) == pytest.approx(float(real[0]), rel=1e-6)  # the mean loss of the real rows
  for a, b in zip(jax_leaves(clean), jax_leaves(dirty)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def jax_leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)]
