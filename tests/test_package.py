"""The package's surface: what ``import divebatch_jax`` loads and what it exports."""

import subprocess
import sys

import divebatch_jax


def test_importing_the_library_loads_neither_flax_nor_the_training_shell():
  code = (
      "import sys, divebatch_jax\n"
      "loaded = sorted(m for m in sys.modules if m == 'flax' or m.startswith(('flax.', 'divebatch_jax.train')))\n"
      "print(loaded)\n"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert result.stdout.strip() == "[]", result.stdout


def test_every_exported_name_exists_and_internals_are_not_exported():
  from divebatch_jax import stats

  for module in (divebatch_jax, stats):
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, (module.__name__, missing)
  for internal in ("tree_sq_norm", "safe_count", "record_of", "jvp_sum_ip", "resolve_mask", "batch_size_of"):
    assert internal not in stats.__all__ and not hasattr(stats, internal), internal


# Runs in a fresh interpreter where importing any package of the `train` extra fails, as on a
# machine where `pip install divebatch_jax` was run without extras.
_WITHOUT_THE_TRAIN_EXTRA = '''
import importlib.abc, sys
BLOCKED = ("tensorflow_datasets", "sklearn", "matplotlib", "orbax", "tensorboardX", "tqdm", "array_record")
class Absent(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return None
sys.meta_path.insert(0, Absent())
'''


def _run_without_the_train_extra(body: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", _WITHOUT_THE_TRAIN_EXTRA + body], capture_output=True, text=True)


def test_the_library_runs_without_the_train_extra():
  body = '''
import jax, jax.numpy as jnp, numpy as np, optax
import divebatch_jax as dbj
from divebatch_jax import data, policies
rng = np.random.default_rng(0)
source = data.ArraySource({"x": rng.normal(size=(40, 3)).astype(np.float32), "y": np.zeros(40, np.int32)}, num_classes=2)
def loss_fn(w, batch):
  return 0.5 * (batch["x"] @ w - 1.0) ** 2
w = jnp.zeros(3)
policy = policies.divebatch(0.1, max_batch_size=32, resize_every=1)
tx = dbj.adaptive_batch(optax.sgd(0.1), policy, num_examples=40, base_batch_size=8)
state = tx.init(w)
batch = source.gather(np.arange(8))
loss, grad, stats = dbj.gradient_stats(loss_fn, w, batch, jnp.ones(8, bool), method="auto")
x, r = np.asarray(batch["x"], np.float64), np.asarray(batch["x"], np.float64) @ np.zeros(3) - 1.0
per_example = x * r[:, None]
assert np.allclose(np.asarray(stats.sum_sq), (per_example ** 2).sum(), rtol=1e-5)
updates, state = tx.update(grad, state, w, stats=stats)
print("library ok", int(stats.count))
'''
  result = _run_without_the_train_extra(body)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "library ok 8"
  for name in ("sklearn", "tensorflow_datasets", "matplotlib", "orbax", "tensorboardX", "tqdm"):
    assert "'" + name not in result.stderr  # nothing tried to import the shell's packages


def test_without_the_train_extra_the_shell_and_digits_say_one_line():
  body = '''
import divebatch_jax
from divebatch_jax import data
try:
  data.digits("train")
except ModuleNotFoundError as error:
  print("digits:", error)
import divebatch_jax.train as shell
shell.console_main()
'''
  result = _run_without_the_train_extra(body)
  assert result.returncode == 2, result.stderr
  hint = "pip install 'divebatch_jax[train]'"
  assert result.stdout.strip() == f"digits: data.digits needs 'scikit-learn', which is not installed: {hint}"
  assert result.stderr.strip().splitlines() == [
      "divebatch-train needs tensorflow-datasets, orbax-checkpoint, scikit-learn, matplotlib, tqdm, tensorboardX, "
      f"which are not installed: {hint}"
  ]


def test_the_wheel_lists_the_shells_packages_only_under_the_train_extra():
  import tomllib
  from pathlib import Path

  from divebatch_jax import _optional

  project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
  plain = " ".join(project["dependencies"]).lower()
  train = " ".join(project["optional-dependencies"]["train"]).lower()
  for distribution in _optional.SHELL_PACKAGES.values():
    assert distribution.lower() not in plain, distribution
    assert distribution.lower() in train, distribution
