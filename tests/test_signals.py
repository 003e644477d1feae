"""SIGTERM / SIGINT: the run finishes its step, checkpoints, exits 128 + signal in one line;
``--out D --resume`` alone then continues to the uninterrupted run's metrics."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_records

from divebatch_jax.train import checkpoints, stopping

ARGS = [
    "--dataset", "synthetic", "--num-examples", "1500", "--num-test-examples", "200",
    "--model", "mlp", "--method", "divebatch", "--epochs", "5", "--batch-size", "4",
    "--max-batch-size", "256", "--resize-every", "2", "--delta", "0.05",
    "--checkpoint-every", "2", "--device-batch", "64",  # pinned: the runs overlap
]
TIMING_FIELDS = {"train_time_s", "eval_time_s", "compilations", "compile_stall_s", "compile_s"}
DEADLINE_S = 1800  # only a run that makes no progress at all fails on it


def _cli(args):
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "divebatch_jax.train", *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lines(path: Path, count: int, process) -> None:
  deadline = time.monotonic() + DEADLINE_S
  while not (path.exists() and path.read_text().count("\n") >= count):
    assert process.poll() is None, process.communicate()
    assert time.monotonic() < deadline, f"no epoch {count} within {DEADLINE_S} s"
    time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  out = tmp_path_factory.mktemp("reference")
  run = _cli(ARGS + ["--out", str(out)])
  assert run.wait(timeout=DEADLINE_S) == 0, run.communicate()
  return run_records(out)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_the_step_and_resume_alone_continues_exactly(signum, reference, tmp_path):
  out = tmp_path / "run"
  victim = _cli(ARGS + ["--out", str(out)])
  _wait_for_lines(out / "metrics.jsonl", 1, victim)  # inside epoch 2 of 5
  victim.send_signal(signum)
  _, err = victim.communicate(timeout=DEADLINE_S)
  assert victim.returncode == 128 + signum, err
  (line,) = err.strip().splitlines()
  assert line.startswith(f"stopped by {signal.Signals(signum).name} after ")
  assert line.endswith(f"checkpoint written: continue with divebatch-train --out {out} --resume")
  step, _ = checkpoints.intact_step(out / "checkpoints")
  host = json.loads((checkpoints.checkpoint_path(out / "checkpoints", step) / checkpoints.HOST_FILE).read_text())
  assert host["epoch"] == len(run_records(out))
  resumed = _cli(["--out", str(out), "--resume"])
  stdout, err = resumed.communicate(timeout=DEADLINE_S)
  assert resumed.returncode == 0, err
  assert "resumed from" in stdout
  got = run_records(out)
  assert len(got) == len(reference) == 5
  for a, b in zip(reference, got):
    assert {k: v for k, v in a.items() if k not in TIMING_FIELDS} == {k: v for k, v in b.items() if k not in TIMING_FIELDS}


def test_on_signals_records_the_first_signal_and_restores_the_handlers():
  before = signal.getsignal(signal.SIGTERM)
  with stopping.on_signals() as stop:
    assert stop.signum is None
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)  # let the handler run
    assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # a second one acts at once
  assert signal.getsignal(signal.SIGTERM) is before
  assert stopping.Interrupted(signal.SIGINT, "x").exit_status == 130
