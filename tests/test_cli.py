"""End-to-end runs of divebatch-train: every method, resume after SIGKILL, metrics, bad flags, plots."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import run_records, write_cbs_file
from divebatch_jax.train import device_batch, main
from divebatch_jax.train import config as config_lib
from divebatch_jax.train import methods
from divebatch_jax.train.config import TrainConfig
from divebatch_jax.train.metrics import REQUIRED_FIELDS

SMALL = [
    "--dataset", "synthetic", "--num-examples", "300", "--num-test-examples", "100",
    "--model", "logreg", "--epochs", "3", "--batch-size", "8", "--max-batch-size", "64",
    "--resize-every", "1", "--growth-every", "1", "--test-every", "2", "--lr", "0.1",
]
TIMING_FIELDS = {"train_time_s", "eval_time_s", "compilations", "compile_s"}


@pytest.mark.slow
@pytest.mark.parametrize("method", methods.NAMES)
def test_every_method_runs_and_writes_metrics(method, tmp_path, capsys, monkeypatch):
  out = tmp_path / method
  # goodput's choices follow the measured rates: fixed ones keep the verdict off the machine's load
  fixed = device_batch.Measurer(None, time_rates=lambda run_at, sizes: {s: 1000.0 * s for s in sizes})
  monkeypatch.setattr(device_batch.Measurer, "from_environment", classmethod(lambda cls: fixed))
  # m pinned: a device batch measured on a busy machine can be 8, leaving goodput one layout
  extra = ["--cbs-file", str(write_cbs_file(tmp_path / "cbs.json", [0, 300, 600], [8, 16, 64]))] if method == "cbs-warmup" else []
  assert main(SMALL + ["--method", method, "--out", str(out), "--device-batch", "64", *extra]) == 0
  records = run_records(out)
  assert [r["epoch"] for r in records] == [1, 2, 3]
  for r in records:
    for field, spec in REQUIRED_FIELDS.items():
      value = r[field]
      assert value is None and spec.nullable or isinstance(value, spec.kind), (field, value)
    assert 0.0 <= r["test_accuracy"] <= 1.0
    assert r["examples"] == 300
  assert records[-1]["total_examples"] == 900
  assert sum(r["steps"] for r in records) == records[-1]["total_steps"]
  measured = [r["statistic"] is not None for r in records]
  assert all(measured) if methods.METHODS[method].needs_stats else not any(measured)
  assert all(r["diversity"] is not None for r in records) == (methods.METHODS[method].statistic == methods.DIVERSITY)
  summary = json.loads((out / "summary.json").read_text())
  assert summary["final_accuracy"] == records[-1]["test_accuracy"]
  assert "final acc" in capsys.readouterr().out


def test_schedules_grow_batch_as_configured(tmp_path):
  out = tmp_path / "adabatch"
  assert main(SMALL + ["--method", "adabatch", "--out", str(out), "--epochs", "4"]) == 0
  assert [r["batch_size"] for r in run_records(out)] == [8, 16, 32, 64]


def test_divebatch_logs_requested_batch_and_resizes(tmp_path):
  out = tmp_path / "dive"
  args = SMALL + ["--method", "divebatch", "--delta", "0.5", "--no-round-batch"]
  assert main(args + ["--out", str(out)]) == 0
  records = run_records(out)
  for r in records:
    requested = r["requested_batch_size"]
    assert requested == pytest.approx(0.5 * 300 * r["diversity"], rel=1e-6)
    expected = min(max(int(requested), r["batch_size"]), 64)
    assert r["next_batch_size"] == expected


def test_divebatch_defaults_ask_for_four_b0_first_and_ramp_only_under_an_lr_rule(tmp_path):
  """Without --delta the first resize asks for 4·b0; --lr-rule linear ramps the lr over 50 steps."""
  out = tmp_path / "dive"
  args = SMALL + ["--method", "divebatch", "--no-round-batch", "--lr-rule", "linear", "--epochs", "2"]
  assert main(args + ["--out", str(out)]) == 0
  first, second = run_records(out)
  assert first["requested_batch_size"] == pytest.approx(4 * 8, rel=1e-5)
  assert first["next_batch_size"] == second["batch_size"] == 32
  # epoch 2 starts right after the resize: the ramp has moved 1/50 of the way from 1 to 32/8
  assert second["lr"] == pytest.approx(0.1 * (1 + (4 - 1) / 50), rel=1e-5)
  assert config_lib.ramp_steps(TrainConfig()) == 0  # AdaBatch's --lr-factor applies at once
  assert config_lib.ramp_steps(TrainConfig(lr_rule="sqrt")) == config_lib.RAMP_UNDER_LR_RULE
  assert config_lib.ramp_steps(TrainConfig(lr_rule="linear", lr_ramp_steps=0)) == 0


def test_rounded_batch_sizes_are_laid_out_without_padding(tmp_path):
  """With rounding (the default) every batch size the rule picks fills whole micro-batches:
  only an epoch's last, partial step is padded."""
  out = tmp_path / "dive"
  args = SMALL + ["--method", "divebatch", "--delta", "0.5", "--device-batch", "16", "--epochs", "4"]
  assert main(args + ["--out", str(out)]) == 0
  records = run_records(out)
  allowed = {8, 16} | {16 * k for k in range(2, 5)}  # ladder 8, 16, then multiples of m = 16
  for r in records:
    assert r["next_batch_size"] in allowed
    b, last = r["batch_size"], 300 % r["batch_size"]
    padded = 0 if last == 0 else (-(-last // 16) * 16 if b > 16 else (8 if last <= 8 else 16)) - last
    assert r["padding_fraction"] == pytest.approx(1 - 300 / (300 + padded))
  assert len({r["batch_size"] for r in records}) > 1


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cnn", "resnet20"])
def test_batch_norm_model_trains_with_divebatch_and_logs_a_finite_diversity(model, tmp_path):
  """BatchNorm in train mode: statistics from micro-batch gradients, each micro-batch
  normalised over its own real rows."""
  out = tmp_path / "bn"
  args = ["--dataset", "digits", "--model", model, "--norm", "batch", "--method", "divebatch",
          "--epochs", "2", "--resize-every", "1", "--batch-size", "32", "--max-batch-size", "128",
          "--num-examples", "400", "--device-batch", "64", "--delta", "0.05", "--out", str(out)]
  assert main(args) == 0
  records = run_records(out)
  assert all(r["diversity"] is not None and r["diversity"] > 0 for r in records)
  assert all(r["train_loss"] == pytest.approx(r["train_loss"]) for r in records)


def _cli(args, **kw):
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "divebatch_jax.train", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch_reproduces_metrics(tmp_path):
  """SIGKILL inside epoch 3 of 5, then ``--out D --resume`` alone: the uninterrupted run's
  metrics, reloading the compiled executables from OUT/compilation_cache. The verdict does
  not depend on the machine's speed: the kill follows epoch 2's line at once, three epochs
  before the end, and the deadline only catches a run that stopped making progress."""
  args = [
      "--dataset", "synthetic", "--num-examples", "3000", "--num-test-examples", "200",
      "--model", "mlp", "--method", "divebatch", "--epochs", "5", "--batch-size", "4",
      "--max-batch-size", "256", "--resize-every", "2", "--delta", "0.05",
      "--checkpoint-every", "1", "--stats-method", "exact",
      "--device-batch", "64",  # the two runs overlap: a measured device batch could differ
  ]
  reference = _cli(args + ["--out", str(tmp_path / "ref")])
  killed_dir = tmp_path / "killed"
  victim = _cli(args + ["--out", str(killed_dir)])
  metrics = killed_dir / "metrics.jsonl"
  deadline = time.monotonic() + 1800
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
    assert victim.poll() is None, victim.communicate()[0]
    assert time.monotonic() < deadline, "the run wrote no second epoch in 30 minutes"
    time.sleep(0.01)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  lines_at_kill = len(metrics.read_text().splitlines())
  assert 2 <= lines_at_kill < 5, "the kill should land before the run finished"
  resumed = _cli(["--out", str(killed_dir), "--resume"])
  out, _ = resumed.communicate(timeout=1800)
  assert resumed.returncode == 0, out
  assert "resumed from" in out
  assert reference.wait(timeout=1800) == 0
  ref, got = run_records(tmp_path / "ref"), run_records(killed_dir)
  assert len(ref) == len(got) == 5
  for a, b in zip(ref, got):
    for key in a:
      if key not in TIMING_FIELDS | {"compile_stall_s"}:
        assert a[key] == b[key], (key, a[key], b[key])
  first_resumed = got[lines_at_kill]  # the first epoch the resumed run trained
  assert first_resumed["compilations"] < ref[0]["compilations"] / 2, (first_resumed, ref[0])


def test_a_device_batch_measured_meanwhile_by_another_process_is_adopted(tmp_path):
  """Two runs that measure at once end with the same device batch: the first one stored wins."""
  from divebatch_jax.train import loop
  from divebatch_jax.train.device_batch import Measurer

  config = TrainConfig(dataset="synthetic", num_examples=300, num_test_examples=100, model="logreg",
                       epochs=1, batch_size=8, max_batch_size=64, method="sgd", progress=False)
  first_rates = {8: 1000.0, 16: 1900.0, 32: 3700.0, 64: 3800.0}  # -> m = 32
  first = Measurer(tmp_path / "cache", time_rates=lambda run_at, sizes: first_rates)
  loop.train_and_evaluate(config.replace(out=str(tmp_path / "first")), measurer=first)
  stored = tmp_path / "cache" / "device_batch.json"
  measured_first = stored.read_text()
  stored.unlink()

  def measure_while_the_first_stores(run_at, sizes):  # a second process, measuring ...
    stored.write_text(measured_first)  # ... while the first one writes its measurement
    return {8: 1000.0, 16: 1900.0, 32: 2000.0, 64: 3900.0}  # -> m = 64

  second = Measurer(tmp_path / "cache", time_rates=measure_while_the_first_stores)
  loop.train_and_evaluate(config.replace(out=str(tmp_path / "second")), measurer=second)
  assert [r["device_batch"] for r in run_records(tmp_path / "second")] == [32]
  assert stored.read_text() == measured_first


def test_existing_run_needs_resume(tmp_path, capsys):
  out = tmp_path / "run"
  assert main(SMALL + ["--method", "sgd", "--epochs", "1", "--out", str(out)]) == 0
  assert main(SMALL + ["--method", "sgd", "--epochs", "1", "--out", str(out)]) == 2
  assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--method", "magic"], "--method"),
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "1024", "--max-batch-size", "512"], "--batch-size"),
        (["--batch-size", "ten"], "--batch-size"),
        (["--dataset", "imagenet"], "--dataset"),
        (["--delta", "-1"], "--delta"),
        (["--devices", "many"], "--devices"),
        (["--preset", "nope"], "--preset"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent/dir"], "/nonexistent/dir"),
        (["--flag-that-does-not-exist"], "unrecognized arguments"),
        (["--lr-batch-coupling", "replace", "--lr-rule", "linear"], "use --lr-rule none"),
        (["--method", "seesaw", "--lr-rule", "sqrt"], "use --lr-rule none"),
        # Seesaw alone on the cosine over examples follows its halvings; the coupling stays per-epoch
        (["--method", "seesaw", "--lr-batch-coupling", "replace", "--schedule", "cosine-examples"], "per-epoch --schedule"),
        (["--lr-batch-coupling", "halve"], "--lr-batch-coupling"),
        (["--method", "linear-ramp", "--ramp-examples", "0"], "--ramp-examples"),
    ],
)
def test_bad_flags_give_one_clear_line(argv, needle, tmp_path, capsys):
  assert main(argv + ["--out", str(tmp_path / "x")]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and needle in err, err


def test_plot_subcommand_writes_png(tmp_path):
  runs = []
  for method in ("sgd", "divebatch"):
    out = tmp_path / method
    assert main(SMALL + ["--method", method, "--epochs", "2", "--out", str(out)]) == 0
    runs.append(str(out))
  png = tmp_path / "cmp.png"
  assert main(["plot", *runs, "-o", str(png)]) == 0
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
  assert main(["plot", str(tmp_path / "missing")]) == 2


def test_results_table_shows_a_diverged_run_without_within_figures():
  from divebatch_jax.train import cli, metrics  # pylint: disable=g-import-not-at-top

  record = {"epoch": 1, "batch_size": 8, "lr": 0.1, "diversity": None, "train_loss": 0.5,
            "test_accuracy": 0.625, "train_time_s": 2.0, "eval_time_s": 0.1, "steps": 38,
            "examples": 300, "compilations": 4, "compile_s": 0.5}
  ok = metrics.summarize([record]) | {"method": "sgd"}
  diverged = metrics.summarize([record], diverged_at_epoch=2) | {"method": "divebatch"}
  at_once = metrics.summarize([], diverged_at_epoch=1) | {"method": "adabatch"}
  head, rule, *rows = cli._results_table([ok, diverged, at_once]).splitlines()
  assert len({len(head), len(rule), *map(len, rows)}) == 1  # columns line up
  assert rows[0].split() == ["sgd", "62.50%", "62.50%", "ep", "1", "38", "300", "2.0", "1.5", "2.0", "1.5", "0.5", "8", "4"]
  assert rows[1].split() == ["divebatch", "62.50%", "62.50%", "div", "ep", "2", "-", "-", "-", "-", "2.0", "1.5", "0.5", "8", "4"]
  assert rows[2].split() == ["adabatch", "-", "-", "div", "ep", "1", "-", "-", "-", "-", "0.0", "0.0", "0.0", "-", "0"]


def _tiny_default(tmp_path):
  return dict(dataset="synthetic", num_examples=300, num_test_examples=100, model="logreg", epochs=3,
              batch_size=8, max_batch_size=64, lr=0.1, resize_every=1, growth_every=1, device_batch=64,
              out=str(tmp_path / "default"))


@pytest.mark.slow
def test_the_default_job_gives_a_verdict_and_a_second_run_trains_nothing(tmp_path, capsys, monkeypatch):
  from divebatch_jax.train import cli, comparison  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(cli, "EMBEDDED_DEFAULT", _tiny_default(tmp_path))
  out = tmp_path / "default"
  assert main([]) == 0
  printed = capsys.readouterr().out
  assert "warm-up:" in printed and "charged to no method" in printed
  rows = json.loads((out / "results.json").read_text())
  assert [r["method"] for r in rows] == ["sgd", "divebatch", "adabatch"]
  sgd_records = run_records(out / "sgd")
  target = sgd_records[-1]["test_accuracy"] - comparison.TARGET_MARGIN
  for row in rows:  # the common target, steps and examples to it, against a brute-force loop
    records = run_records(out / row["method"])
    assert row["target_accuracy"] == pytest.approx(target)
    assert row["total_steps"] == sum(r["steps"] for r in records) == records[-1]["total_steps"]
    first = next((i for i, r in enumerate(records) if r["test_accuracy"] >= target - 1e-9), None)
    expected = None if first is None else sum(r["steps"] for r in records[: first + 1])
    assert row["steps_to_target"] == expected
    assert row["verdict"].startswith(f"{row['method']}: ") and row["verdict"] in printed
    assert row["final_batch_size"] == records[-1]["last_batch_size"]
  assert "total steps" in printed and "steps to target" in printed
  listing = sorted(p.name for p in out.iterdir())
  assert main([]) == 0  # the second run: done, nothing trained
  assert "the default job is done" in capsys.readouterr().out
  assert sorted(p.name for p in out.iterdir()) == listing
  assert main(["--resume"]) == 0  # resumes the comparison (nothing left to train), no single run
  printed = capsys.readouterr().out
  assert "starting from scratch" not in printed and not (out / "metrics.jsonl").exists()
  assert all(r["method"] in printed for r in rows) and len(run_records(out / "sgd")) == 3


def test_a_flag_with_the_default_job_says_it_trains_one_run(tmp_path, capsys):
  args = SMALL + ["--epochs", "1", "--out", str(tmp_path / "one"), "--device-batch", "64"]
  assert main(args) == 0
  printed = capsys.readouterr().out
  assert "trains one divebatch run, not the default comparison" in printed
  assert main(args + ["--method", "sgd", "--out", str(tmp_path / "two")]) == 0
  assert "not the default comparison" not in capsys.readouterr().out


def test_a_rule_deciding_only_after_the_last_epoch_gets_the_note(tmp_path, capsys):
  args = SMALL + ["--method", "divebatch", "--epochs", "2", "--resize-every", "2", "--out", str(tmp_path / "r")]
  assert main(args) == 0
  assert "note: --method divebatch measures first in epoch 2 and decides at its end" in capsys.readouterr().out
