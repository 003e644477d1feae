"""The README's Python examples run as written and do what they say."""

import pytest
import contextlib
import io
import re
from pathlib import Path

import divebatch_jax as dbj

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.slow
def test_readme_loop_runs_grows_the_batch_and_keeps_the_rate():
  blocks = _blocks()
  assert blocks, "README has no python example"
  namespace: dict = {}
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  lines = printed.getvalue().splitlines()
  assert [line.split(":")[0] for line in lines] == [f"epoch {e}" for e in range(1, 7)]
  assert all("Δ̂" in line and "loss" in line and "test acc" in line for line in lines)
  assert namespace["step"].executables.stall_seconds == 0.0  # compiled ahead: nothing on demand
  state = namespace["state"]
  summary = dbj.batch_state_summary(state.opt_state)
  assert summary["epoch"] == 6 and summary["examples_seen"] == 6 * namespace["train"].num_examples
  assert summary["batch_size"] > 16, "the README's run never grew its batch"
  assert summary["lr_scale"] == 1.0  # lr_rule "none": the rate set is the rate applied
  assert float(namespace["out"].loss) < 1.0


def test_readme_accumulation_snippet_runs_in_the_loop():
  """The MultiSteps-style snippet, run on the first example's objects with a step of 3 micro-batches."""
  blocks = _blocks()
  namespace: dict = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  data = namespace["data"]
  with data.Pipeline(namespace["train"], ladder=data.bucket_ladder(16, 32), seed=1) as pipeline:
    batch = pipeline.next_batch(96)
  assert len(batch.micro_batches) == 3
  before = dbj.batch_state_summary(namespace["state"].opt_state)
  namespace.update(batch=batch, epoch=6)
  exec(compile(blocks[1], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  after = dbj.batch_state_summary(namespace["state"].opt_state)
  assert after["step"] == before["step"] + 1  # three micro-batches, one update
  assert after["examples_seen"] == before["examples_seen"] + 96
