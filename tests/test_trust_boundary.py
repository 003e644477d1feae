"""The run folder and the cache folder as trust boundaries (issue 31, class 1).

A symlink or a special file planted where a run writes is refused in one line or
replaced, never written through; a FIFO never hangs a run; a checkpoint folder that is
a symlink is refused in one line.
"""

import contextlib
import json
import os
import signal

import jax.numpy as jnp
import pytest

from divebatch_jax.train import checkpoints, device_batch, main, metrics

TINY = [
    "--dataset", "synthetic", "--num-examples", "200", "--num-test-examples", "50",
    "--model", "logreg", "--method", "sgd", "--batch-size", "8", "--max-batch-size", "32",
    "--device-batch", "32", "--compilation-cache", "off",
]
RECORD = {"epoch": 1, "batch_size": 8, "lr": 0.1, "diversity": None, "train_loss": 1.0, "test_accuracy": 0.5,
          "train_time_s": 1.0, "eval_time_s": 0.1, "steps": 2, "examples": 16, "compilations": 1}


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
  return err


@contextlib.contextmanager
def _no_hang(seconds=120):
  """Fails the test (instead of hanging the suite) when the block blocks for good; the
  limit is far above any run here and is never the verdict of a passing test."""
  def hung(signum, frame):
    raise AssertionError("the run blocked on a special file")
  previous = signal.signal(signal.SIGALRM, hung)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _target(tmp_path, text="precious\nlast line without newline"):
  target = tmp_path / "target.txt"
  target.write_text(text)
  return target


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl"])
def test_a_symlink_where_the_run_writes_is_refused_and_its_target_untouched(tmp_path, capsys, name):
  out = tmp_path / "run"
  out.mkdir()
  text = json.dumps(RECORD) + "\n" + "a last line without a newline"  # a "torn tail" to metrics
  target = _target(tmp_path, text)
  os.symlink(target, out / name)
  assert main(TINY + ["--out", str(out), "--epochs", "1"]) == 2
  err = _one_error_line(capsys)
  assert f"{name} is a symlink" in err
  assert target.read_text() == text


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl"])
def test_a_fifo_where_the_run_writes_is_refused_without_hanging(tmp_path, capsys, name):
  out = tmp_path / "run"
  out.mkdir()
  os.mkfifo(out / name)
  with _no_hang():
    assert main(TINY + ["--out", str(out), "--epochs", "1"]) == 2
  err = _one_error_line(capsys)
  assert f"{name} is a FIFO" in err


def test_symlinks_at_the_old_temporary_names_are_never_written_through(tmp_path, capsys):
  out = tmp_path / "run"
  out.mkdir()
  target = _target(tmp_path)
  for name in (".summary.json.tmp", ".config.json.tmp"):
    os.symlink(target, out / name)
  assert main(TINY + ["--out", str(out), "--epochs", "1"]) == 0
  assert target.read_text() == "precious\nlast line without newline"
  for name in ("summary.json", "config.json"):
    assert not (out / name).is_symlink() and json.loads((out / name).read_text())
  assert not [p for p in out.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]


def test_a_plot_never_writes_through_a_symlink_planted_at_its_path(tmp_path):
  from divebatch_jax.train import plots

  run = tmp_path / "run"
  assert main(TINY + ["--out", str(run), "--epochs", "1"]) == 0
  target = _target(tmp_path)
  png = tmp_path / "comparison.png"
  os.symlink(target, png)
  plots.plot_runs([run], png)
  assert target.read_text() == "precious\nlast line without newline"  # the link was replaced, not followed
  assert not png.is_symlink() and png.read_bytes().startswith(b"\x89PNG")


def test_the_device_batch_cache_never_writes_through_a_planted_temporary_name(tmp_path):
  cache = tmp_path / "cache"
  cache.mkdir()
  target = _target(tmp_path)
  os.symlink(target, cache / f".{device_batch.CACHE_FILE}.{os.getpid()}")
  measurer = device_batch.Measurer(cache, time_rates=lambda run_at, sizes: {8: 100.0, 16: 190.0})
  rates = measurer.rates("key", lambda size: None, [8, 16], echo=lambda line: None)
  assert rates == {8: 100.0, 16: 190.0}
  assert target.read_text() == "precious\nlast line without newline"
  stored = cache / device_batch.CACHE_FILE
  assert not stored.is_symlink() and json.loads(stored.read_text()) == {"key": {"8": 100.0, "16": 190.0}}
  assert measurer.read("key", [8, 16]) == ({8: 100.0, 16: 190.0}, None)


def test_a_cache_file_that_is_a_fifo_is_not_read(tmp_path):
  cache = tmp_path / "cache"
  cache.mkdir()
  os.mkfifo(cache / device_batch.CACHE_FILE)
  with _no_hang():
    assert device_batch.Measurer(cache).read("key", [8]) == (None, None)


def test_a_checkpoint_folder_that_is_a_symlink_is_refused_in_one_line(tmp_path, capsys):
  directory, elsewhere = tmp_path / "ckpt", tmp_path / "elsewhere"
  checkpoints.save_checkpoint(elsewhere, 1, {"w": jnp.ones(2)}, {})
  directory.mkdir()
  os.symlink(checkpoints.checkpoint_path(elsewhere, 1), checkpoints.checkpoint_path(directory, 1))
  before = sorted(p.name for p in checkpoints.checkpoint_path(elsewhere, 1).iterdir())
  for call in (lambda: checkpoints.save_checkpoint(directory, 1, {"w": jnp.ones(2)}, {}),
               lambda: checkpoints.committed_steps(directory)):
    with pytest.raises(PermissionError, match="checkpoint folder .*step_00000001 is a symlink"):
      call()
  assert sorted(p.name for p in checkpoints.checkpoint_path(elsewhere, 1).iterdir()) == before
  # Through the CLI: one line, no traceback (was: "Cannot call rmtree on a symbolic link").
  out = tmp_path / "run"
  assert main(TINY + ["--out", str(out), "--epochs", "1", "--checkpoint-every", "1"]) == 0
  os.symlink(checkpoints.checkpoint_path(elsewhere, 1), out / "checkpoints" / "step_00000002")
  capsys.readouterr()
  assert main(TINY + ["--out", str(out), "--epochs", "2", "--checkpoint-every", "1", "--resume"]) == 2
  assert "is a symlink" in _one_error_line(capsys)
  assert sorted(p.name for p in checkpoints.checkpoint_path(elsewhere, 1).iterdir()) == before


def test_a_leftover_temporary_checkpoint_that_is_a_symlink_is_unlinked_not_followed(tmp_path):
  directory, victim = tmp_path / "ckpt", tmp_path / "victim"
  victim.mkdir()
  (victim / "keep.txt").write_text("keep")
  directory.mkdir()
  os.symlink(victim, directory / ".tmp-step_00000001")
  checkpoints.save_checkpoint(directory, 1, {"w": jnp.ones(2)}, {})
  assert (victim / "keep.txt").read_text() == "keep"
  assert checkpoints.committed_steps(directory) == [1]


def test_the_metrics_writer_still_drops_a_torn_tail_of_its_own_file(tmp_path):
  path = tmp_path / metrics.METRICS_FILE
  record = RECORD
  path.write_text(json.dumps(record) + "\n" + '{"epoch": 2, "bat')
  with metrics.MetricsWriter(path) as log:
    assert log.last_epoch == 1
    assert log.write(dict(record, epoch=2))
  assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [1, 2]


# ------------------------------------------------------------------ forged or mistyped state (class 2)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
  """A 2-epoch run with a checkpoint after each epoch (steps 1 and 2)."""
  out = tmp_path_factory.mktemp("forged") / "run"
  assert main(TINY + ["--out", str(out), "--epochs", "2", "--checkpoint-every", "1"]) == 0
  return out


def _copy(run, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  return shutil.copytree(run, tmp_path / "run")


def _sha(data: bytes) -> str:
  import hashlib  # pylint: disable=g-import-not-at-top
  return hashlib.sha256(data).hexdigest()


def _forge(checkpoint, name, data: bytes):
  """Writes ``data`` as ``name`` of ``checkpoint`` with the manifest and marker made to match."""
  (checkpoint / name).write_bytes(data)
  if name != "manifest.json":
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"][name] = {"size": len(data), "sha256": _sha(data)}
    (checkpoint / "manifest.json").write_bytes(json.dumps(manifest).encode())
  marker = json.loads((checkpoint / "COMMITTED").read_text())
  marker["manifest_sha256"] = _sha((checkpoint / "manifest.json").read_bytes())
  (checkpoint / "COMMITTED").write_text(json.dumps(marker))


GOOD_HOST = {"epoch": 2, "sampler": [2, 0], "device_batch": 32}
FORGED_HOSTS = {
    "empty object": {}, "a list": [], "device batch 0": dict(GOOD_HOST, device_batch=0),
    "device batch -4": dict(GOOD_HOST, device_batch=-4), "device batch 1e9": dict(GOOD_HOST, device_batch=10**9),
    "epoch -3": dict(GOOD_HOST, epoch=-3), "epoch 100": dict(GOOD_HOST, epoch=100),
    "a bad sampler": dict(GOOD_HOST, sampler="x"), "an unknown key": dict(GOOD_HOST, rng=[1, 2]),
    "device batch a string": dict(GOOD_HOST, device_batch="32"), "a bad partial": dict(GOOD_HOST, partial={"steps": 1}),
}


def _resume_skips_to_step_1(run, capsys, file):
  capsys.readouterr()
  assert main(TINY + ["--out", str(run), "--epochs", "3", "--checkpoint-every", "1", "--resume"]) == 0
  captured = capsys.readouterr()
  assert "Traceback" not in captured.err
  assert f"step_00000002 is damaged: {file}" in captured.out and "restoring step 1" in captured.out
  assert [r["epoch"] for r in metrics.read_records(run / metrics.METRICS_FILE)] == [1, 2, 3]


@pytest.mark.parametrize("case", list(FORGED_HOSTS))
def test_a_forged_host_json_whose_hashes_match_is_skipped_for_the_older_checkpoint(two_epochs, tmp_path, capsys, case):
  run = _copy(two_epochs, tmp_path)
  _forge(checkpoints.checkpoint_path(run / "checkpoints", 2), "host.json", json.dumps(FORGED_HOSTS[case]).encode())
  _resume_skips_to_step_1(run, capsys, "host.json")


@pytest.mark.parametrize("manifest", [b"{}", b'{"files": []}', b"not json", b'{"files": {"../../x": {"size": 1, "sha256": "00"}}}'])
def test_a_forged_manifest_is_skipped_for_the_older_checkpoint(two_epochs, tmp_path, capsys, manifest):
  run = _copy(two_epochs, tmp_path)
  _forge(checkpoints.checkpoint_path(run / "checkpoints", 2), "manifest.json", manifest)
  _resume_skips_to_step_1(run, capsys, "manifest.json")


@pytest.mark.parametrize("stored, needle", [
    ({"lr": "0.05"}, "'lr' must be a number or null, got '0.05'"),
    ({"dataset": 5}, "'dataset' must be a string, got 5"),
    ({"schedule_milestones": 5}, "'schedule_milestones' must be a list of integers, got 5"),
    ({"epochs": True}, "'epochs' must be an integer, got True"),
    (None, "must hold a JSON object of settings, got null"),
    ([], "must hold a JSON object of settings, got []"),
])
def test_a_mistyped_config_json_is_one_line_naming_the_file(two_epochs, tmp_path, capsys, stored, needle):
  run = _copy(two_epochs, tmp_path)
  config_file = run / "config.json"
  if isinstance(stored, dict):
    stored = dict(json.loads(config_file.read_text()), **stored)
  config_file.write_text(json.dumps(stored))
  before = (run / metrics.METRICS_FILE).read_bytes()
  capsys.readouterr()
  assert main(["--out", str(run), "--resume"]) == 2
  err = _one_error_line(capsys)
  assert str(config_file) in err and needle in err
  assert (run / metrics.METRICS_FILE).read_bytes() == before


# ------------------------------------------------------------------ damage found before training (class 3)


def _lines(run):
  return (run / metrics.METRICS_FILE).read_text().splitlines(keepends=True)


@pytest.mark.parametrize("damage", ["delete the last line", "tear the last line", "tear a middle line", "empty the file", "remove the file"])
def test_metrics_damage_for_a_committed_epoch_is_repaired_from_the_checkpoint_before_training(two_epochs, tmp_path, capsys, damage):
  run = _copy(two_epochs, tmp_path)
  original = [json.loads(line) for line in _lines(run)]
  lines = _lines(run)
  damaged = {
      "delete the last line": lines[:1], "tear the last line": lines[:1] + [lines[1][:20]],
      "tear a middle line": [lines[0][:20] + "\n", lines[1]], "empty the file": [], "remove the file": None,
  }[damage]
  if damaged is None:
    (run / metrics.METRICS_FILE).unlink()
  else:
    (run / metrics.METRICS_FILE).write_text("".join(damaged))
  capsys.readouterr()
  assert main(TINY + ["--out", str(run), "--epochs", "3", "--checkpoint-every", "1", "--resume"]) == 0
  out = capsys.readouterr().out
  assert "rewrote epochs 1..2 from the checkpoint's records" in out
  assert out.index("rewrote epochs") < out.index("epoch   3 |")  # repaired before epoch 3 trained
  records = metrics.read_records(run / metrics.METRICS_FILE)
  assert [r["epoch"] for r in records] == [1, 2, 3] and records[:2] == original
  summary = json.loads((run / "summary.json").read_text())
  assert summary["epochs"] == 3
  assert summary["steps"] == sum(r["steps"] for r in records) and summary["examples"] == sum(r["examples"] for r in records)


def test_metrics_damage_without_records_in_the_checkpoint_is_refused_before_training(two_epochs, tmp_path, capsys):
  run = _copy(two_epochs, tmp_path)
  checkpoint = checkpoints.checkpoint_path(run / "checkpoints", 2)
  host = json.loads((checkpoint / "host.json").read_text())
  host.pop("records")  # a checkpoint from before records were kept
  _forge(checkpoint, "host.json", json.dumps(host).encode())
  (run / metrics.METRICS_FILE).write_text(_lines(run)[0])
  before = (run / metrics.METRICS_FILE).read_bytes()
  capsys.readouterr()
  assert main(TINY + ["--out", str(run), "--epochs", "3", "--checkpoint-every", "1", "--resume"]) == 2
  err = _one_error_line(capsys)
  assert "metrics.jsonl holds epochs 1..1, not 1..2" in err and "no records to repair it from" in err
  assert (run / metrics.METRICS_FILE).read_bytes() == before
  assert checkpoints.committed_steps(run / "checkpoints") == [1, 2]


# ------------------------------------------------------------------ npz: validation before allocation (class 4)


def _npz_with_forged_shape(path, shape, compress: bool):
  """An npz whose x_train header claims ``shape`` while holding a (4, 4) float32 array."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  x = np.zeros((4, 4), np.float32)
  (np.savez_compressed if compress else np.savez)(path, x_train=x, y_train=np.zeros(4, int), x_test=x, y_test=np.zeros(4, int))
  import zipfile  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(path) as archive:
    members = {name: archive.read(name) for name in archive.namelist()}
  claimed = repr(shape).encode()
  data = members["x_train.npy"]
  end = data.index(b"\n")  # the header's padding spaces absorb the longer shape: same length
  header = data[:end].replace(b"(4, 4)", claimed, 1)
  members["x_train.npy"] = header[:end] + data[end:]
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive:
    for name, data in members.items():
      archive.writestr(name, data)
  return path


@pytest.mark.parametrize("compress", [False, True])
def test_an_npz_header_claiming_a_huge_shape_is_refused_before_any_allocation(tmp_path, capsys, compress):
  import zipfile  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top
  path = _npz_with_forged_shape(tmp_path / "forged.npz", (2**40, 4), compress)
  assert path.stat().st_size < 4096
  with zipfile.ZipFile(path) as archive, archive.open("x_train.npy") as f:
    np.lib.format.read_magic(f)
    assert np.lib.format.read_array_header_1_0(f)[0] == (2**40, 4)  # the forged header parses
  # numpy would allocate 16 TiB for it before reading (a MemoryError traceback on main)
  assert main(["--dataset", f"npz:{path}", "--epochs", "1", "--out", str(tmp_path / "run"), "--compilation-cache", "off"]) == 2
  err = _one_error_line(capsys)
  assert str(path) in err and "'x_train'" in err and "1099511627776, 4" in err


def test_float64_features_beyond_float32_are_refused_naming_the_file_and_key(tmp_path, capsys):
  import numpy as np  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).normal(size=(40, 3))
  x_bad = x.copy()
  x_bad[5, 1] = 1e300
  path = tmp_path / "wide.npz"
  np.savez(path, x_train=x_bad, y_train=np.arange(40) % 2, x_test=x[:10], y_test=np.arange(10) % 2)
  assert main(["--dataset", f"npz:{path}", "--epochs", "1", "--out", str(tmp_path / "run"), "--compilation-cache", "off"]) == 2
  err = _one_error_line(capsys)
  assert str(path) in err and "'x_train'" in err and "float32" in err and "1 value(s)" in err
  np.savez(path, x_train=x * 1e30, y_train=np.arange(40) % 2, x_test=x[:10], y_test=np.arange(10) % 2)
  from divebatch_jax.data.sources import npz_source  # pylint: disable=g-import-not-at-top
  assert npz_source(path).train.num_examples == 40  # large but finite in float32: accepted


# ------------------------------------------------------------------ full disk and a second SIGINT (class 5)


def test_a_second_sigint_during_a_save_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
  out = tmp_path / "run"
  real_save_checkpoint, calls = checkpoints.save_checkpoint, []

  def save_with_two_sigints(directory, step, *args, **kwargs):
    calls.append(step)
    if len(calls) == 2:  # the second save (epoch 2): Ctrl-C twice while it writes
      os.kill(os.getpid(), signal.SIGINT)  # the first: recorded, the run would stop after it
      os.kill(os.getpid(), signal.SIGINT)  # the second: at once (KeyboardInterrupt)
    return real_save_checkpoint(directory, step, *args, **kwargs)

  monkeypatch.setattr(checkpoints, "save_checkpoint", save_with_two_sigints)
  assert main(TINY + ["--out", str(out), "--epochs", "3", "--checkpoint-every", "1"]) == 130
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "stopped at once by SIGINT" in err and "Traceback" not in err, err
  assert checkpoints.committed_steps(out / "checkpoints") == [1]
  monkeypatch.setattr(checkpoints, "save_checkpoint", real_save_checkpoint)
  assert main(TINY + ["--out", str(out), "--epochs", "3", "--checkpoint-every", "1", "--resume"]) == 0
  assert [r["epoch"] for r in metrics.read_records(out / metrics.METRICS_FILE)] == [1, 2, 3]


def test_a_full_disk_inside_orbax_is_the_promised_one_line(tmp_path, capsys, monkeypatch):
  """tensorstore reports a full disk as a ValueError (RESOURCE_EXHAUSTED ... os_error_code='28'),
  which orbax raises from its save and logs from its threads; the text below is the one a
  3 MB tmpfs gave (a real full file system was checked by hand: see the report of issue 31)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  message = ('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "x": Failed to write '
             "571744 bytes to file 7: No space left on device [os_error_code='28']")
  real_save, calls = ocp.StandardCheckpointer.save, []

  def full_after_the_first(self, *args, **kwargs):
    calls.append(1)
    if len(calls) > 1:
      import logging  # pylint: disable=g-import-not-at-top
      logging.getLogger("absl").error("_SignalingThread.run() raised an exception: %s", message)
      raise ValueError(message)
    return real_save(self, *args, **kwargs)

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", full_after_the_first)
  out = tmp_path / "run"
  assert main(TINY + ["--out", str(out), "--epochs", "3", "--checkpoint-every", "1"]) == 2
  captured = capsys.readouterr()
  assert "RESOURCE_EXHAUSTED" not in captured.err + captured.out
  err = captured.err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: no space left on device (") and "--resume" in err
  assert checkpoints.committed_steps(out / "checkpoints") == [1]
  monkeypatch.setattr(ocp.StandardCheckpointer, "save", real_save)
  assert main(TINY + ["--out", str(out), "--epochs", "3", "--checkpoint-every", "1", "--resume"]) == 0


# ------------------------------------------------------------------ flags at their edges (class 6)


@pytest.mark.parametrize("flags, needle", [
    (["--seed", str(2**63)], "--seed must be an integer in [0, 2**63), got 9223372036854775808"),
    (["--seed", str(2**64 + 5)], "--seed must be an integer in [0, 2**63)"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**63), got -1"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
    (["--momentum", "nan"], "--momentum must be a finite number, got nan"),
    (["--delta=-inf"], "--delta must be a finite number, got -inf"),
    (["--clip-norm", "inf"], "--clip-norm must be a finite number, got inf"),
    (["--out", ""], "--out must name a folder, got ''"),
    (["--out", os.fsdecode(b"runs/\xff\xfe")], "--out must be UTF-8 text"),
])
def test_flags_at_their_edges_are_one_line_naming_the_flag_and_range(tmp_path, capsys, monkeypatch, flags, needle):
  monkeypatch.chdir(tmp_path)
  args = TINY + ["--epochs", "1"] + (flags if "--out" in flags else flags + ["--out", str(tmp_path / "run")])
  assert main(args) == 2
  assert needle in _one_error_line(capsys)
  assert list(tmp_path.iterdir()) == []  # nothing written, not even into the current folder


def test_the_largest_seed_is_accepted(tmp_path):
  from divebatch_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.validate(config_lib.TrainConfig(seed=2**63 - 1, out=str(tmp_path)))
  assert config.seed == 2**63 - 1


# ------------------------------------------------------------------ the compilation cache (class 7)


@pytest.mark.parametrize("problem", ["writable by others", "owned by another user"])
def test_a_compilation_cache_others_can_write_is_refused_in_one_line(tmp_path, capsys, problem):
  cache = tmp_path / "cache"
  cache.mkdir()
  if problem == "writable by others":
    os.chmod(cache, 0o777)
  else:
    if os.geteuid() != 0:
      pytest.skip("only root can give a folder to another user")
    os.chown(cache, 4242, 4242)
  out = tmp_path / "run"
  assert main(TINY[:-2] + ["--out", str(out), "--epochs", "1", "--compilation-cache", str(cache)]) == 2
  err = _one_error_line(capsys)
  assert f"--compilation-cache {cache}" in err and problem.split()[0] in err and "native code" in err
  assert list(cache.iterdir()) == [] and not (out / metrics.METRICS_FILE).exists()


def test_the_default_compilation_cache_is_created_private_and_used(tmp_path):
  out = tmp_path / "run"
  assert main(TINY[:-2] + ["--out", str(out), "--epochs", "1"]) == 0
  mode = (out / "compilation_cache").stat().st_mode
  assert not mode & 0o077 and any((out / "compilation_cache").iterdir())
