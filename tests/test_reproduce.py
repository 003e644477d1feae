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
