"""benchmarks/reproduce.py: protocol D's configurations and summary.json's pinned shape."""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

from divebatch_jax.train import config as config_lib
from divebatch_jax.train import methods as methods_lib

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # reproduce.py imports its sibling protocol_l
_SPEC = importlib.util.spec_from_file_location("reproduce", BENCHMARKS / "reproduce.py")
reproduce = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(reproduce)

PINNED_KEYS = {"seeds", "final_accuracy_mean", "final_accuracy_std", "total_steps_mean",
               "total_examples_mean", "train_seconds_mean"}


def _cell(root, protocol, method, seed, accuracy, steps, seconds):
  out = root / protocol / method / f"seed{seed}"
  out.mkdir(parents=True)
  summary = {"final_accuracy": accuracy, "steps": steps, "examples": 10 * steps, "train_time_s": seconds}
  (out / "summary.json").write_text(json.dumps(summary))
  (out / "metrics.jsonl").write_text("")


def test_summary_json_has_the_pinned_shape_and_the_means(tmp_path):
  cells = [(0, 0.40, 100, 5.0), (1, 0.44, 120, 7.0), (2, 0.45, 110, 6.0)]
  for seed, accuracy, steps, seconds in cells:
    _cell(tmp_path, "D", "sgd-small", seed, accuracy, steps, seconds)
  _cell(tmp_path, "A", "adabatch", 0, 0.3, 50, 2.0)
  reproduce.write_summary(tmp_path, tmp_path / "summary.json")
  found = json.loads((tmp_path / "summary.json").read_text())
  assert set(found) == {"A", "D"}
  row = found["D"]["sgd-small"]
  assert set(row) == PINNED_KEYS and row["seeds"] == 3
  assert row["final_accuracy_mean"] == pytest.approx(43.0)
  assert row["final_accuracy_std"] == pytest.approx(statistics.stdev([40.0, 44.0, 45.0]))
  assert row["total_steps_mean"] == 110 and row["total_examples_mean"] == 1100
  assert row["train_seconds_mean"] == pytest.approx(6.0)
  assert found["A"]["adabatch"]["final_accuracy_std"] == 0.0  # one seed


def test_protocol_d_compares_every_growing_rule_with_and_without_the_coupling():
  compared = reproduce.methods("D", reproduce.PROTOCOLS["D"])
  # goodput: machine-measured rates; cbs-warmup: a curve measured on the protocol's own run (protocol L)
  growing = set(methods_lib.NAMES) - {"sgd", "goodput", "seesaw", "cbs-warmup"}
  for rule in growing:
    assert compared[rule]["lr_batch_coupling"] == "none"
    assert compared[f"{rule}-coupled"]["lr_batch_coupling"] == "replace"
  assert compared["divebatch-microbatch"]["stats_method"] == "microbatch"
  for name in compared:  # every cell is a valid configuration
    config = reproduce.cell_config("D", name, 0, False, Path("/tmp/unused"), {})
    config_lib.validate(config)


def _l_cell(root, method, seed, losses, steps_per_epoch):
  out = root / "L" / method / f"seed{seed}"
  out.mkdir(parents=True)
  total, records = 0, []
  for epoch, (loss, steps) in enumerate(zip(losses, steps_per_epoch), start=1):
    total += steps
    records.append({"epoch": epoch, "batch_size": 8, "next_batch_size": 8, "lr": 1e-3, "diversity": None,
                    "train_loss": loss, "test_accuracy": 0.3, "test_loss": loss, "train_time_s": 1.0,
                    "eval_time_s": 0.1, "steps": steps, "examples": 100, "compilations": 0,
                    "total_steps": total, "total_tokens": 3200 * epoch})
  (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  summary = {"final_accuracy": 0.3, "steps": total, "examples": 100 * len(losses), "train_time_s": 3.0}
  (out / "summary.json").write_text(json.dumps(summary))


def test_protocol_l_summary_adds_the_pinned_loss_fields(tmp_path):
  b0 = [[2.6, 2.4, 2.30], [2.6, 2.4, 2.32], [2.6, 2.4, 2.31]]  # final mean 2.31
  rule = [[2.5, 2.305, 2.29], [2.5, 2.35, 2.31], [2.5, 2.4, 2.33]]  # seeds reach 2.31 at epochs 2, 3, never
  for seed in range(3):
    _l_cell(tmp_path, "constant-b0", seed, b0[seed], [100, 100, 100])
    _l_cell(tmp_path, "growing", seed, rule[seed], [100, 25, 12])
  found = reproduce.protocol_summary("L", tmp_path)
  row = found["growing"]
  assert PINNED_KEYS <= set(row)
  finals = [r[-1] for r in rule]
  assert row["final_test_loss_mean"] == pytest.approx(statistics.fmean(finals))
  assert row["final_test_loss_std"] == pytest.approx(statistics.stdev(finals))
  assert row["steps_to_b0_loss_mean"] == pytest.approx(statistics.fmean([125, 137]))  # the two seeds that reach it
  assert row["b0_loss_seeds"] == 2
  assert found["constant-b0"]["final_test_loss_mean"] == pytest.approx(2.31)
  never = [[2.9, 2.8, 2.7]] * 3
  for seed in range(3):
    _l_cell(tmp_path, "slow", seed, never[seed], [10, 10, 10])
  assert reproduce.protocol_summary("L", tmp_path)["slow"]["steps_to_b0_loss_mean"] is None
