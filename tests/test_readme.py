"""The README's Python example runs as written and does what it says."""

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs_and_trains():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert blocks, "README has no python example"
  namespace: dict = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["batch_size"] == 16
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(16, 64)), jnp.float32), "y": jnp.asarray(rng.integers(0, 10, 16))}
  mask = jnp.ones(16, bool)
  losses = [float(namespace["train_step"](namespace["model"], namespace["optimizer"], batch, mask)) for _ in range(5)]
  assert losses[-1] < losses[0]
