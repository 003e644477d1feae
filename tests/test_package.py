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
