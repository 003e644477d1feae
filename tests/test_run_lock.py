"""One run per --out: a second run is refused in one line naming the holder; a killed holder's lock is taken over."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from divebatch_jax.train import main, run_lock

SMALL = [
    "--dataset", "synthetic", "--num-examples", "200", "--num-test-examples", "50",
    "--model", "logreg", "--epochs", "2", "--batch-size", "8", "--max-batch-size", "32",
    "--method", "sgd", "--device-batch", "32",
]
# A process that holds the lock of argv[1] until its stdin closes (a run in progress).
HOLDER = (
    "import sys; from divebatch_jax.train import run_lock\n"
    "with run_lock.hold(sys.argv[1]):\n"
    "  print('held', flush=True); sys.stdin.read()\n"
)


def _holder(out: Path) -> subprocess.Popen:
  process = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline() == "held\n"
  return process


def _snapshot(out: Path) -> dict:
  return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_second_run_into_a_held_out_is_refused_in_one_line_and_touches_nothing(tmp_path, capsys):
  out = tmp_path / "run"
  assert main(SMALL + ["--out", str(out), "--epochs", "1"]) == 0  # the first run's files
  first = _holder(out)  # ... and the first run, resumed, still going
  try:
    before = _snapshot(out)
    capsys.readouterr()
    assert main(SMALL + ["--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --out {out} is in use by another run (pid {first.pid}): wait for it to finish, or choose another --out."]
    assert _snapshot(out) == before
  finally:
    first.stdin.close()
    first.wait()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
  out = tmp_path / "run"
  victim = _holder(out)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert (out / run_lock.LOCK_FILE).read_text().strip() == str(victim.pid)  # stale pid left behind
  assert main(SMALL + ["--out", str(out)]) == 0
  assert (out / "metrics.jsonl").read_text().count("\n") == 2


def test_hold_writes_the_pid_and_refuses_a_second_holder_in_this_process(tmp_path):
  with run_lock.hold(tmp_path) as path:
    assert path.read_text().strip() == str(os.getpid())
    with pytest.raises(run_lock.RunLocked, match=f"pid {os.getpid()}"):
      with run_lock.hold(tmp_path):
        pass
  with run_lock.hold(tmp_path):  # released on exit
    pass
