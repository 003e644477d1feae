"""User errors of the third reliability round: one line naming the flag or file, exit 2."""

import errno
import json
from pathlib import Path

import optax
import pytest

from divebatch_jax import adaptive_batch, policies
from divebatch_jax.train import checkpoints, main, metrics, resume

TINY = [
    "--dataset", "synthetic", "--num-examples", "300", "--num-test-examples", "100",
    "--model", "logreg", "--method", "sgd", "--batch-size", "8", "--max-batch-size", "64",
    "--device-batch", "64",
]


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
  return err


@pytest.mark.parametrize("out, needle", [
    ("x" * 300, "--out: the name 'xxxx"),
    ("/".join(["y" * 200] * 25), "--out is 5024 bytes long; paths must be shorter than 4096"),
])
def test_an_out_path_too_long_is_one_line(tmp_path, capsys, out, needle):
  assert main(TINY + ["--epochs", "1", "--out", str(tmp_path / out) if len(out) < 1000 else out]) == 2
  assert needle in _one_error_line(capsys)


def test_a_data_file_name_too_long_is_one_line(tmp_path, capsys):
  assert main(["--dataset", f"npz:{tmp_path / ('z' * 300)}.npz", *TINY[2:], "--out", str(tmp_path / "run")]) == 2
  assert "file name too long" in _one_error_line(capsys)


def test_a_full_disk_at_a_checkpoint_loses_nothing_committed_and_says_so(tmp_path, capsys, monkeypatch):
  out = tmp_path / "run"
  real_write, calls = checkpoints._write_synced, []

  def disk_full_after_the_first_checkpoint(path, text):
    calls.append(path)
    if len(calls) > 3:  # host.json, manifest, commit marker of checkpoint 1; then the disk is full
      raise OSError(errno.ENOSPC, "No space left on device", str(path))
    real_write(path, text)

  monkeypatch.setattr(checkpoints, "_write_synced", disk_full_after_the_first_checkpoint)
  assert main(TINY + ["--epochs", "3", "--checkpoint-every", "1", "--out", str(out)]) == 2
  err = _one_error_line(capsys)
  assert err.startswith("error: no space left on device (") and "nothing already committed is lost" in err
  assert [r["epoch"] for r in metrics.read_records(out / "metrics.jsonl")] == [1, 2]
  assert checkpoints.committed_steps(out / "checkpoints") == [1]
  assert checkpoints.verify_checkpoint(checkpoints.checkpoint_path(out / "checkpoints", 1)) is None
  assert json.loads((out / resume.CONFIG_FILE).read_text())["epochs"] == 3
  monkeypatch.setattr(checkpoints, "_write_synced", real_write)  # space freed
  assert main(["--out", str(out), "--resume"]) == 0
  assert [r["epoch"] for r in metrics.read_records(out / "metrics.jsonl")] == [1, 2, 3]


def test_num_examples_above_the_data_gets_a_note_and_plot_draws_an_sgd_run(tmp_path, capsys):
  out = tmp_path / "sgd"
  args = ["--dataset", "digits", "--num-examples", "100000", "--num-test-examples", "100000", *TINY[6:]]
  assert main(args + ["--epochs", "1", "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "--num-examples 100000 is larger than the split (n = 1438 examples); using all 1438." in printed
  assert "--num-test-examples 100000 is larger than the split (n = 359 examples); using all 359." in printed
  assert main(["plot", str(out), "-o", str(tmp_path / "sgd.png")]) == 0  # no diversity at all
  assert (tmp_path / "sgd.png").read_bytes()[:4] == b"\x89PNG"


def test_library_arguments_of_adaptive_batch_are_named():
  policy = policies.divebatch(0.1, max_batch_size=64)
  with pytest.raises(TypeError, match=r"^inner must be an optax.GradientTransformation .*got NoneType\.$"):
    adaptive_batch(None, policy, num_examples=100, base_batch_size=8)
  for decay in (1.5, 1.0, -0.1):
    with pytest.raises(ValueError, match=r"^noise_ema_decay must be in \[0, 1\), got "):
      adaptive_batch(optax.sgd(0.1), policy, num_examples=100, base_batch_size=8, noise_ema_decay=decay)
  adaptive_batch(optax.sgd(0.1), policy, num_examples=100, base_batch_size=8, noise_ema_decay=0.0)
