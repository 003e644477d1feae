"""examples/flax_mnist_style.py and its constant-batch twin, run as a user would."""

import difflib
import warnings

import pytest

from test_examples import EXAMPLES, _example


def test_divebatch_is_a_diff_of_at_most_15_lines():
  twin = (EXAMPLES / "flax_mnist_style_constant.py").read_text().splitlines()
  divebatch = (EXAMPLES / "flax_mnist_style.py").read_text().splitlines()
  changed = [line for line in difflib.unified_diff(twin, divebatch, lineterm="", n=0)
             if line[:1] in "+-" and not line.startswith(("+++", "---"))]
  assert 0 < len(changed) <= 15, "\n".join(changed)


def test_constant_twin_trains():
  history = _example("flax_mnist_style_constant").main(epochs=2, echo=lambda _: None)
  assert [h["batch_size"] for h in history] == [32, 32]
  assert history[-1]["train_accuracy"] > 0.5 and history[-1]["test_accuracy"] > 0.2


@pytest.mark.slow
def test_divebatch_example_grows_the_batch_without_warnings():
  lines = []
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    history = _example("flax_mnist_style").main(epochs=2, echo=lines.append)
  assert [h["batch_size"] for h in history] == [32, 64]  # first_resize=64 after epoch 0
  assert history[-1]["train_accuracy"] > 0.5
  assert lines[0].startswith("data: ")
  assert not [w for w in caught if "stats=" in str(w.message) or "epoch drift" in str(w.message)]
