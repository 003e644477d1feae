"""Data parallelism: 8 simulated CPU devices give the single-device statistics, updates and runs.

Each check runs in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be set before
jax starts).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import run_records

ROOT = Path(__file__).resolve().parents[1]


def _run_python(code: str, *, devices: int = 8, env=None, timeout=600) -> str:
  full_env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  full_env.update(env or {})
  proc = subprocess.run(
      [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
      capture_output=True, text=True, timeout=timeout,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout


STATS_CODE = """
import json
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
import divebatch_jax as dbj
from divebatch_jax import policies
from divebatch_jax.train import parallel

assert jax.device_count() == 8
class MLP(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(6, 16, rngs=rngs); self.b = nnx.Linear(16, 3, rngs=rngs)
  def __call__(self, x):
    return self.b(jnp.tanh(self.a(x)))
graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)
def loss_fn(p, batch):
  logits = nnx.merge(graphdef, p)(batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

rng = np.random.default_rng(0)
batch = {"x": rng.normal(size=(64, 6)).astype(np.float32), "y": rng.integers(0, 3, 64).astype(np.int32)}
mask = np.arange(64) < 45   # uneven: devices 6 and 7 hold padding only
tx = dbj.adaptive_batch(optax.sgd(0.1, momentum=0.9), policies.divebatch(0.5, 64, resize_every=1),
                        num_examples=90, base_batch_size=45)

def step(params, opt_state, batch, mask):
  loss, grad, stats = dbj.gradient_stats(loss_fn, params, batch, mask)
  updates, opt_state = tx.update(grad, opt_state, params, stats=stats)
  return optax.apply_updates(params, updates), opt_state, stats

results = {}
for name, devices in (("single", 1), ("sharded", 8)):
  mesh = parallel.make_mesh(devices)
  row_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  b = jax.device_put(batch, row_sharding); m = jax.device_put(mask, row_sharding)
  p, s = parallel.replicate((params, tx.init(params)), mesh)
  jstep = jax.jit(step)
  with dbj.CompileCounter() as compiles:
    for _ in range(3):   # two epochs of 90 examples in steps of 45: resizes twice
      p, s, stats = jstep(p, s, b, m)
  if devices == 8:
    assert len(stats.sum_g["a"]["kernel"].sharding.device_set) == 8
  results[name] = {
      "count": int(stats.count), "sum_sq": float(stats.sum_sq), "sum_ip": float(stats.sum_ip),
      "sum_g": np.concatenate([np.ravel(x) for x in jax.tree.leaves(stats.sum_g)]).tolist(),
      "params": np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)]).tolist(),
      "batch_size": dbj.current_batch_size(s), "compiles": compiles.count_of("step"),
  }
print(json.dumps(results))
"""


def test_sharded_statistics_and_updates_equal_single_device():
  results = json.loads(_run_python(STATS_CODE).strip().splitlines()[-1])
  single, sharded = results["single"], results["sharded"]
  assert single["count"] == sharded["count"] == 45
  for key in ("sum_sq", "sum_ip"):
    assert sharded[key] == pytest.approx(single[key], rel=1e-5)
  for key in ("sum_g", "params"):
    assert sharded[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6)
  assert single["batch_size"] == sharded["batch_size"]
  assert sharded["compiles"] == 1


RUN_ARGS = [
    "--dataset", "synthetic", "--num-examples", "300", "--num-test-examples", "100", "--model", "mlp",
    "--epochs", "3", "--batch-size", "8", "--max-batch-size", "64", "--resize-every", "1",
    "--delta", "0.5", "--method", "divebatch", "--stats-method", "exact",
    "--device-batch", "64",  # pinned: the runs are compared, and a measured m follows the machine's load
]
COMPARED = ("batch_size", "next_batch_size", "diversity", "train_loss", "test_loss", "test_accuracy", "steps", "examples")


def _assert_same_run(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for ra, rb in zip(a, b):
    for key in COMPARED:
      if isinstance(ra[key], float):
        assert rb[key] == pytest.approx(ra[key], rel=1e-5), key
      else:
        assert rb[key] == ra[key], key


@pytest.mark.slow
def test_divebatch_run_on_8_devices_equals_one_device(tmp_path):
  code = f"""
import sys
from divebatch_jax.train import main
args = {RUN_ARGS!r}
assert main(args + ["--devices", "1", "--out", {str(tmp_path / "one")!r}]) == 0
assert main(args + ["--devices", "all", "--out", {str(tmp_path / "all")!r}]) == 0
"""
  _run_python(code)
  one, every = run_records(tmp_path / "one"), run_records(tmp_path / "all")
  _assert_same_run(one, every)
  assert {r["devices"] for r in one} == {1} and {r["devices"] for r in every} == {8}
  # Buckets 8..64 on 8 devices: the statistics and plain steps compile once per bucket at most.
  assert sum(r["compilations"] for r in every) <= sum(r["compilations"] for r in one) + 4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(args: list[str]) -> None:
  """Runs ``divebatch-train ARGS --distributed`` as two JAX processes of 2 CPU devices each."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             DIVEBATCH_COORDINATOR=f"127.0.0.1:{port}", DIVEBATCH_NUM_PROCESSES="2")
  procs = [
      subprocess.Popen(
          [sys.executable, "-m", "divebatch_jax.train", *args, "--distributed", "--devices", "all"],
          cwd=ROOT, env=dict(env, DIVEBATCH_PROCESS_ID=str(pid)), stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, text=True,
      )
      for pid in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out


def _single_process(args: list[str]) -> None:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  subprocess.run([sys.executable, "-m", "divebatch_jax.train", *args, "--devices", "all"],
                 cwd=ROOT, env=env, check=True, capture_output=True)


@pytest.mark.slow
def test_two_process_distributed_run_equals_one_process(tmp_path):
  _two_processes(RUN_ARGS + ["--out", str(tmp_path / "multi")])
  _single_process(RUN_ARGS + ["--out", str(tmp_path / "single")])
  single = run_records(tmp_path / "single")
  for folder in (tmp_path / "multi", tmp_path / "multi" / "process_1"):
    records = run_records(folder)
    _assert_same_run(single, records)
    assert {r["processes"] for r in records} == {2} and {r["devices"] for r in records} == {4}


@pytest.mark.slow
def test_two_process_run_stopped_and_resumed_equals_the_uninterrupted_run(tmp_path):
  """Two processes stop after epoch 2 (their checkpoint written through orbax by both),
  then resume to epoch 3: the metrics equal one uninterrupted 3-epoch run."""
  args = [a for a in RUN_ARGS if a not in ("--epochs", "3")] + ["--checkpoint-every", "1"]
  multi = ["--out", str(tmp_path / "multi")]
  _two_processes(args + ["--epochs", "2"] + multi)
  _two_processes(args + ["--epochs", "3", "--resume"] + multi)
  _single_process(args + ["--epochs", "3", "--out", str(tmp_path / "single")])
  single = run_records(tmp_path / "single")
  for folder in (tmp_path / "multi", tmp_path / "multi" / "process_1"):
    _assert_same_run(single, run_records(folder))


def test_compile_ahead_works_on_two_devices(tmp_path):
  """Every executable of a two-device run is compiled ahead of the steps that need it: no
  failure note, no compile stall."""
  out = tmp_path / "two"
  code = f"""
from divebatch_jax.train import main
assert main({RUN_ARGS!r} + ["--epochs", "2", "--device-batch", "32", "--devices", "all", "--out", {str(out)!r}]) == 0
"""
  printed = _run_python(code, devices=2)
  assert "compiling ahead failed" not in printed
  records = run_records(out)
  assert {r["devices"] for r in records} == {2}
  assert [r["compile_stall_s"] for r in records] == [0.0, 0.0]  # nothing compiled inside a step
