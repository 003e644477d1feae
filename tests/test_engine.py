"""The training engine: one fused call per step (GPU/TPU) and accumulate + apply calls (CPU)
give the same run; nothing compiles after the first epoch; policies' sizes fill whole
micro-batches."""

import json
from pathlib import Path

import pytest

from divebatch_jax.train import loop, main

ARGS = [
    "--dataset", "synthetic", "--num-examples", "300", "--num-test-examples", "100",
    "--model", "mlp", "--epochs", "4", "--batch-size", "8", "--max-batch-size", "64",
    "--device-batch", "16", "--resize-every", "2", "--delta", "0.5", "--lr", "0.1",
]
SAME = ("batch_size", "next_batch_size", "diversity", "requested_batch_size", "train_loss", "test_loss",
        "test_accuracy", "steps", "padding_fraction")


def _records(out):
  return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_fused_single_call_steps_equal_accumulated_steps(tmp_path, monkeypatch):
  assert main(ARGS + ["--method", "divebatch", "--out", str(tmp_path / "calls")]) == 0
  monkeypatch.setattr(loop, "single_call", lambda: True)
  assert main(ARGS + ["--method", "divebatch", "--out", str(tmp_path / "fused")]) == 0
  calls, fused = _records(tmp_path / "calls"), _records(tmp_path / "fused")
  assert len({r["batch_size"] for r in calls}) > 1  # steps of one and of several micro-batches
  for a, b in zip(calls, fused):
    for key in SAME:
      if isinstance(a[key], float):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
      else:
        assert b[key] == a[key], key


@pytest.mark.parametrize("method", ["adabatch", "divebatch", "norm-test"])
def test_nothing_compiles_on_the_critical_path_after_the_first_epoch(method, tmp_path):
  out = tmp_path / method
  assert main(ARGS + ["--method", method, "--growth-every", "1", "--out", str(out)]) == 0
  records = _records(out)
  assert len({r["batch_size"] for r in records}) > 1, "the batch size never changed"
  for r in records[1:]:
    assert r["compile_stall_s"] == 0.0 and r["compilations"] == 0, r
