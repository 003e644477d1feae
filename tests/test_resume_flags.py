"""``--out D --resume`` alone continues the run in D from its stored config.json; a changed
trajectory flag is refused before anything slow starts."""

import shutil

from conftest import run_records

from divebatch_jax.train import checkpoints, main, parallel, resume
from divebatch_jax.train.config import TrainConfig

TINY = [
    "--dataset", "synthetic", "--num-examples", "200", "--num-test-examples", "50",
    "--model", "logreg", "--method", "divebatch", "--batch-size", "8", "--max-batch-size", "32",
    "--resize-every", "1", "--delta", "0.5", "--lr", "0.1", "--device-batch", "32",
    "--checkpoint-every", "1",
]
TIMING_FIELDS = {"train_time_s", "eval_time_s", "compilations", "compile_stall_s", "compile_s"}


def _records(out):
  return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in run_records(out)]


def test_resume_alone_continues_with_the_stored_flags(tmp_path, capsys):
  assert main(TINY + ["--epochs", "3", "--out", str(tmp_path / "whole")]) == 0
  part = tmp_path / "part"
  assert main(TINY + ["--epochs", "3", "--out", str(part)]) == 0
  lines = (part / "metrics.jsonl").read_text().splitlines(keepends=True)
  (part / "metrics.jsonl").write_text("".join(lines[:1]))  # as if killed after epoch 1 ...
  for step in (2, 3):
    shutil.rmtree(checkpoints.checkpoint_path(part / resume.CHECKPOINTS_DIR, step))
  capsys.readouterr()
  assert main(["--out", str(part), "--resume"]) == 0  # ... and resumed with no other flag
  printed = capsys.readouterr().out
  assert "resumed from" in printed and "changed" not in printed
  assert _records(part) == _records(tmp_path / "whole")


def test_resumed_config_takes_the_stored_settings_and_the_given_flags(tmp_path):
  stored = TrainConfig(dataset="synthetic", model="logreg", lr=0.3, epochs=4, out="elsewhere")
  resume.write_config(tmp_path, stored)
  given = TrainConfig(out=str(tmp_path), resume=True, epochs=9, lr=0.05)
  got = resume.resumed_config(given, {"out", "resume", "epochs"})
  assert got == stored.replace(out=str(tmp_path), resume=True, epochs=9)  # lr: not given, stored
  assert resume.resumed_config(TrainConfig(out=str(tmp_path / "none"), resume=True), set()) == TrainConfig(
      out=str(tmp_path / "none"), resume=True)


def test_a_changed_trajectory_flag_is_refused_before_the_mesh_and_the_data(tmp_path, capsys, monkeypatch):
  out = tmp_path / "run"
  assert main(TINY + ["--epochs", "1", "--out", str(out)]) == 0
  capsys.readouterr()

  def too_late(*args, **kwargs):
    raise AssertionError("the refusal should come before the mesh")

  monkeypatch.setattr(parallel, "make_mesh", too_late)
  assert main(["--out", str(out), "--resume", "--dataset", "digits"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: --resume: --dataset was 'synthetic' in the stored run, now 'digits'")
