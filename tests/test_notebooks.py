"""The notebooks run top to bottom on CPU, offline, and do what their text says.

Each notebook in ``notebooks/`` is executed with nbclient in a kernel running this
interpreter (``sys.executable``), with its working directory in pytest's temporary folder, the
environment variable ``DIVEBATCH_NOTEBOOK_SMOKE=1`` (every notebook reads it to shrink its
sizes) and ``TMPDIR`` inside that folder, where the notebooks write their runs. After the
notebook's last cell the test runs one cell of its own that prints the
notebook's results as JSON; the checks below hold those results against the rules the
notebooks describe (the batch-size formulas, recomputed here in NumPy), and check that the
committed notebooks carry no outputs.
"""

import json
import math
import os
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from conftest import run_records
from divebatch_jax.train.methods import NAMES as METHODS

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ("01_quickstart.ipynb", "02_flax_cifar10.ipynb", "03_policies.ipynb", "04_language_model.ipynb")
OFFLINE_CIFAR10 = ROOT.parent / "shared" / "data" / "tfds" / "cifar10_jpeg"
CELL_TIMEOUT_S = 1800  # catches a hung cell, not a slow one: a loaded 2-core machine runs cells many times slower
KERNEL_NAME = "divebatch-notebook-test"
REPORT_MARK = "NOTEBOOK-TEST-REPORT "

# The test's own last cell per notebook: the values the checks need, as one JSON line.
REPORT_CELLS = {
    "01_quickstart.ipynb": """
print(NOTEBOOK_TEST_REPORT_MARK + json.dumps(dict(
    executable=sys.executable, cwd=os.getcwd(), smoke=SMOKE, cpu_s=sum(os.times()[:2]),
    num_examples=train.num_examples, delta=DELTA, b0=B0, b_max=B_MAX, lr=LR, history=history,
    resize_epochs=[e + 1 for e in range(EPOCHS) if policy.needs_stats(e)],
    shapes=sorted(pipeline.padding.shapes),
    compiles={"stats_step": compiles.count_of("stats_step"),
              "plain_step": compiles.count_of("plain_step")})))
""",
    "02_flax_cifar10.ipynb": """
print(NOTEBOOK_TEST_REPORT_MARK + json.dumps(dict(
    executable=sys.executable, cwd=os.getcwd(), smoke=SMOKE, cpu_s=sum(os.times()[:2]),
    dataset=DATASET, out_dir=str(OUT_DIR), methods=list(summaries), num_train=num_train,
    delta=base.delta, b0=B0, b_max=B_MAX, every=RESIZE_EVERY, epochs=EPOCHS)))
""",
    "03_policies.ipynb": """
print(NOTEBOOK_TEST_REPORT_MARK + json.dumps(dict(
    executable=sys.executable, cwd=os.getcwd(), smoke=SMOKE, cpu_s=sum(os.times()[:2]),
    out_dir=str(OUT_DIR), methods=list(runs), num_train=num_train, delta=base.delta, b0=B0,
    b_max=B_MAX, every=EVERY, epochs=EPOCHS, adabatch_lr_factor=CONFIGS["adabatch"].lr_factor)))
""",
    "04_language_model.ipynb": """
print(NOTEBOOK_TEST_REPORT_MARK + json.dumps(dict(
    executable=sys.executable, cwd=os.getcwd(), smoke=SMOKE, cpu_s=sum(os.times()[:2]),
    out_dir=str(OUT_DIR), methods=list(runs), context=CONTEXT, num_windows=NUM_WINDOWS,
    b0=B0, b_max=B_MAX, epochs=EPOCHS, vocabulary=vocabulary.size)))
""",
}
REPORT_PRELUDE = f"import json, os, sys\nNOTEBOOK_TEST_REPORT_MARK = {REPORT_MARK!r}\n"


def _read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def _kernel_manager(folder: Path) -> AsyncKernelManager:
  """A kernel manager whose only kernel runs ``sys.executable -m ipykernel_launcher``."""
  spec_dir = folder / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  spec = {
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "divebatch_jax notebook test",
      "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  specs = KernelSpecManager(kernel_dirs=[str(folder / "kernels")])
  return AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def _execute(name: str, folder: Path, **env: str) -> tuple[nbformat.NotebookNode, dict]:
  """Runs notebook ``name`` and its report cell in ``folder``: (executed notebook, report)."""
  nb = _read(name)
  nb.cells.append(nbformat.v4.new_code_cell(REPORT_PRELUDE + REPORT_CELLS[name]))
  work, temp = folder / "cwd", folder / "tmp"
  work.mkdir()
  temp.mkdir()
  client = NotebookClient(
      nb,
      km=_kernel_manager(folder),
      timeout=CELL_TIMEOUT_S,
      resources={"metadata": {"path": str(work)}},
  )
  kernel_env = dict(
      os.environ, DIVEBATCH_NOTEBOOK_SMOKE="1", JAX_PLATFORMS="cpu", TMPDIR=str(temp), **env
  )
  start = time.perf_counter()
  client.execute(env=kernel_env)
  seconds = time.perf_counter() - start
  lines = [
      line[len(REPORT_MARK):]
      for line in _stream_text(nb.cells[-1]).splitlines()
      if line.startswith(REPORT_MARK)
  ]
  assert len(lines) == 1, f"{name}: the report cell printed {len(lines)} report lines"
  report = json.loads(lines[0])
  print(f"{name}: {seconds:.1f} s wall, {report['cpu_s']:.1f} s CPU in the kernel")
  assert report["executable"] == sys.executable
  assert report["smoke"] is True
  assert Path(report["cwd"]).resolve() == work.resolve()
  if "out_dir" in report:  # run directories go to the temporary folder, not the repository
    assert temp.resolve() in Path(report["out_dir"]).resolve().parents
  return nb, report


def _stream_text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def _cell(nb, cell_id: str):
  matches = [c for c in nb.cells if c.get("id") == cell_id]
  assert len(matches) == 1, f"expected one cell with id {cell_id!r}, found {len(matches)}"
  return matches[0]


def _has_png(cell) -> bool:
  return any("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def _divebatch_next(delta: float, n: int, diversity: float, b: int, b_max: int) -> set[int]:
  """floor(min(max(δ·n·Δ̂, b), b_max)), in float32 as on device and in float64."""
  requests = {
      float(np.float32(delta) * np.float32(n) * np.float32(diversity)),
      delta * n * diversity,
  }
  return {min(max(math.floor(r), b), b_max) for r in requests}


# ------------------------------------------------------------------ committed notebooks


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_valid_and_has_no_outputs(name):
  nb = _read(name)
  nbformat.validate(nb)
  assert nb.metadata["kernelspec"]["name"] == "python3"
  code = [c for c in nb.cells if c.cell_type == "code"]
  for cell in code:
    assert cell.outputs == [], f"{name}: cell {cell.id} has committed outputs"
    assert cell.execution_count is None, f"{name}: cell {cell.id} has an execution count"
  install = _cell(nb, "install").source
  assert install.startswith("# Colab") and 'if "google.colab" in sys.modules:' in install
  assert 'REPO_URL = "' in install
  assert 'os.environ.get("DIVEBATCH_NOTEBOOK_SMOKE") == "1"' in _cell(nb, "sizes").source


# ------------------------------------------------------------------ executed notebooks


@pytest.mark.slow
def test_quickstart_runs_and_follows_the_divebatch_rule(tmp_path):
  nb, report = _execute("01_quickstart.ipynb", tmp_path)
  history = report["history"]
  n, b0, b_max, delta = report["num_examples"], report["b0"], report["b_max"], report["delta"]
  assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
  assert history[0]["batch_size"] == b0
  for h, following in zip(history, history[1:] + [None]):
    b = h["batch_size"]
    assert h["steps"] == math.ceil(n / b)
    assert h["lr"] == pytest.approx(report["lr"] * math.sqrt(b / b0), rel=1e-6)  # lr_rule="sqrt"
    if h["epoch"] in report["resize_epochs"]:
      assert math.isfinite(h["diversity"]) and h["diversity"] > 0
      assert h["next_batch_size"] in _divebatch_next(delta, n, h["diversity"], b, b_max)
    else:
      assert math.isnan(h["diversity"]) and h["next_batch_size"] == b
    if following is not None:
      assert following["batch_size"] == h["next_batch_size"]
    assert 0.0 <= h["test_accuracy"] <= 1.0
  assert history[-1]["batch_size"] > b0, "the quickstart's batch size never grew"
  shapes = report["shapes"]
  for step in ("stats_step", "plain_step"):
    assert 1 <= report["compiles"][step] <= len(shapes), (step, report["compiles"], shapes)
  assert _has_png(_cell(nb, "plots"))


def _check_cifar_runs(report: dict) -> None:
  out = Path(report["out_dir"])
  assert report["methods"] == ["sgd", "adabatch", "divebatch"]
  b0, b_max, every = report["b0"], report["b_max"], report["every"]
  runs = {m: run_records(out / m) for m in report["methods"]}
  for records in runs.values():
    assert [r["epoch"] for r in records] == list(range(1, report["epochs"] + 1))
    assert all(r["examples"] == report["num_train"] for r in records)
  assert {r["batch_size"] for r in runs["sgd"]} == {b0}
  for r in runs["adabatch"]:  # doubles after every `every` epochs, capped
    assert r["batch_size"] == min(b0 * 2 ** ((r["epoch"] - 1) // every), b_max)
  for r in runs["divebatch"]:
    if r["epoch"] % every == 0:
      assert r["next_batch_size"] in _divebatch_next(
          report["delta"], report["num_train"], r["diversity"], r["batch_size"], b_max
      )
    else:
      assert r["diversity"] is None and r["next_batch_size"] == r["batch_size"]
  assert (out / "comparison.png").is_file()


@pytest.mark.skipif(
    not OFFLINE_CIFAR10.is_dir(), reason=f"the offline CIFAR-10 copy is not at {OFFLINE_CIFAR10}"
)
@pytest.mark.slow
def test_cifar10_notebook_trains_on_the_offline_cifar10(tmp_path):
  nb, report = _execute("02_flax_cifar10.ipynb", tmp_path)
  assert report["dataset"] == "cifar10"
  assert "not available" not in _stream_text(_cell(nb, "data"))
  _check_cifar_runs(report)
  assert _has_png(_cell(nb, "plot"))


@pytest.mark.slow
def test_cifar10_notebook_without_data_says_what_is_missing_and_falls_back(tmp_path):
  empty = tmp_path / "no_data"
  empty.mkdir()
  nb, report = _execute("02_flax_cifar10.ipynb", tmp_path, DIVEBATCH_DATA_DIR=str(empty))
  assert report["dataset"] == "digits"
  message = _stream_text(_cell(nb, "data"))
  assert "CIFAR-10 is not available offline here" in message
  assert str(empty) in message and "cifar10_jpeg" in message  # where it looked, and for what
  assert "Falling back to scikit-learn's bundled digits" in message
  _check_cifar_runs(report)


@pytest.mark.slow
def test_policies_notebook_runs_every_policy_by_its_rule(tmp_path):
  nb, report = _execute("03_policies.ipynb", tmp_path)
  out = Path(report["out_dir"])
  # cbs-warmup follows a curve measured on a finished run (divebatch-train cbs): not a rule of its own
  assert sorted(report["methods"]) == sorted(set(METHODS) - {"cbs-warmup"}), "the notebook must show every policy"
  b0, b_max, every = report["b0"], report["b_max"], report["every"]
  runs = {m: run_records(out / m) for m in report["methods"]}
  for records in runs.values():
    assert [r["epoch"] for r in records] == list(range(1, report["epochs"] + 1))
  for method, records in runs.items():
    sizes = [r["batch_size"] for r in records] + [records[-1]["next_batch_size"]]
    assert sizes[0] == b0 and max(sizes) <= b_max, method  # capped
    if method != "goodput":  # Pollux moves both ways; every other rule only grows
      assert sizes == sorted(sizes), method
  assert {r["batch_size"] for r in runs["sgd"]} == {b0}
  for method in ("adabatch", "sebs"):
    for r in runs[method]:
      assert r["batch_size"] == min(b0 * 2 ** ((r["epoch"] - 1) // every), b_max), method
  lr = runs["sgd"][0]["lr"]
  for r in runs["adabatch"]:  # ×lr_factor per doubling
    doublings = round(math.log2(r["batch_size"] / b0))
    assert r["lr"] == pytest.approx(lr * report["adabatch_lr_factor"] ** doublings, rel=1e-6)
  assert {r["lr"] for r in runs["sebs"]} == {lr}
  for r in runs["divebatch"]:
    if r["epoch"] % every == 0:
      assert r["next_batch_size"] in _divebatch_next(
          report["delta"], report["num_train"], r["diversity"], r["batch_size"], b_max
      )
    else:
      assert r["next_batch_size"] == r["batch_size"]
  epochs, n = report["epochs"], report["num_train"]
  per_increment = (epochs // 2 * n) // math.ceil((b_max - b0) / b0)  # the ramp: b0 per ⌊N/k⌋ examples
  for r in runs["linear-ramp"]:
    assert r["batch_size"] == min(b0 + b0 * ((r["epoch"] - 1) * n // per_increment), b_max)
  for r in runs["seesaw"]:  # cosine: b0·2^k after the k-th halving, lr·min(d·S, 1) under SGD
    d = 0.5 * (1 + math.cos(math.pi * (r["epoch"] - 1) / epochs))
    size = min(b0 * 2 ** math.floor(math.log2(1 / d) + 1e-4), b_max)
    assert r["batch_size"] == size
    assert r["lr"] == pytest.approx(lr * min(d * size / b0, 1.0), rel=1e-5)
  for method in ("norm-test", "inner-product", "noise-scale", "goodput"):  # instrumented throughout:
    decided = [r for r in runs[method] if r["steps"] >= 10]  # a decision every 10 steps
    assert decided and all(r["statistic"] is not None for r in decided), method
  assert _has_png(_cell(nb, "plots"))


@pytest.mark.slow
def test_language_model_notebook_trains_three_rules_at_one_token_budget(tmp_path):
  nb, report = _execute("04_language_model.ipynb", tmp_path)
  out, context, b0 = Path(report["out_dir"]), report["context"], report["b0"]
  assert report["methods"] == ["sgd", "divebatch", "norm-test"]
  runs = {m: run_records(out / m) for m in report["methods"]}
  budget = report["num_windows"] * context * report["epochs"]
  for records in runs.values():
    assert len(records) == report["epochs"]
    assert records[-1]["total_tokens"] == budget  # one token budget for every rule
    for r in records:
      assert math.isfinite(r["test_loss"]) and r["test_loss"] < math.log(report["vocabulary"])
      assert r["bits_per_char"] == pytest.approx(r["test_loss"] / math.log(2))
      assert r["tokens"] == r["examples"] * context
  assert {r["batch_size"] for r in runs["sgd"]} == {b0} and runs["sgd"][-1]["next_batch_size"] == b0
  assert runs["divebatch"][-1]["next_batch_size"] > b0  # decided within the epoch
  assert runs["divebatch"][-1]["total_steps"] < runs["sgd"][-1]["total_steps"]
  assert _has_png(_cell(nb, "plots"))
