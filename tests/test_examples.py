"""The examples/ scripts, run as a user would, against the library's own engine and the CLI."""

import importlib.util
from pathlib import Path

import jax
import optax
import pytest

from conftest import run_records
import divebatch_jax as dbj
from divebatch_jax import data, policies
from divebatch_jax.train import main as cli_main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
  spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _quiet(_):
  return None


@pytest.mark.slow
def test_linen_hand_loop_equals_the_engine_and_is_safe_with_stats_on_every_step():
  """The hand loop (gradient_stats / masked gradient, count=) and TrainStep give the same Δ̂
  and batch sizes; passing stats= on every step changes nothing."""
  example = _example("linen_optax")
  by_hand = example.main(epochs=6, echo=_quiet)
  every_step = example.main(epochs=6, echo=_quiet, stats_every_step=True)
  assert [h["batch_size"] for h in by_hand] == [h["batch_size"] for h in every_step]
  assert [h["statistic"] for h in by_hand] == pytest.approx([h["statistic"] for h in every_step], rel=1e-5, nan_ok=True)
  assert len({h["batch_size"] for h in by_hand}) > 1, "the batch size never grew"
  assert all(h["lr_scale"] == 1.0 for h in by_hand)  # no silent lr scaling

  # The same model, data and policy through the library's step.
  train = data.digits("train")
  model = example.MLP()
  params = model.init(jax.random.key(0), jax.numpy.zeros((1, 64)))

  def loss_fn(p, batch):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, batch["x"]), batch["y"])

  policy = policies.divebatch(None, 256, resize_every=2, first_resize=64)
  tx = dbj.adaptive_batch(optax.sgd(0.05, momentum=0.9), policy, num_examples=train.num_examples, base_batch_size=16)
  step = dbj.train_step(loss_fn, tx, policy=policy, method="auto")
  state = step.init(params)
  engine = []
  with data.Pipeline(train, ladder=data.bucket_ladder(16, 256), seed=0) as pipeline:
    for epoch in range(6):
      size = dbj.current_batch_size(state.opt_state, epoch=epoch)
      for batch in pipeline.epoch(epoch, size):
        (micro_batch, mask), = batch.micro_batches
        state, _ = step(state, micro_batch, mask, epoch=epoch)
      engine.append((size, dbj.batch_state_summary(state.opt_state)["statistic"]))
  assert [h["batch_size"] for h in by_hand] == [size for size, _ in engine]
  assert [h["statistic"] for h in by_hand] == pytest.approx([s for _, s in engine], rel=1e-4, nan_ok=True)


@pytest.mark.slow
def test_nnx_pipeline_example_reproduces_the_cli(tmp_path):
  history = _example("nnx_pipeline").main(epochs=6, device_batch=64, echo=_quiet)
  out = tmp_path / "cli"
  argv = ["--dataset", "digits", "--model", "mlp", "--method", "divebatch", "--epochs", "6",
          "--batch-size", "16", "--max-batch-size", "512", "--delta", "0.1", "--resize-every", "2",
          "--device-batch", "64", "--no-round-batch", "--lr", "0.05", "--momentum", "0.9",
          "--weight-decay", "5e-4", "--out", str(out)]
  assert cli_main(argv) == 0
  records = run_records(out)
  assert [h["batch_size"] for h in history] == [r["batch_size"] for r in records]
  assert [h["next_batch_size"] for h in history] == [r["next_batch_size"] for r in records]
  for h, r in zip(history, records):
    if r["diversity"] is not None:
      assert h["statistic"] == pytest.approx(r["diversity"], rel=1e-6)
  assert len({h["batch_size"] for h in history}) > 1


def test_adamw_example_sets_the_rate_it_says_and_compiles_once_per_layout():
  history, fused_compiles = _example("adamw_norm_test").main(epochs=4, echo=_quiet)
  for h in history:
    assert h["learning_rate"] == pytest.approx(h["lr_set"], rel=1e-6)  # not rescaled by b / b0
  sizes = {h["batch_size"] for h in history} | {h["next_batch_size"] for h in history}
  layouts = {data.bucket_ladder(16, 256).shape_for(b) for b in sizes}
  assert len(sizes) > 1
  # One executable per layout the steps used (the epochs' last, partial steps included);
  # a learning rate set from a float each epoch adds none.
  assert fused_compiles <= len(data.bucket_ladder(16, 256).sizes)
  assert fused_compiles >= len(layouts)


@pytest.mark.slow
def test_char_gpt_example_learns_changes_its_batch_and_samples_text():
  example = _example("char_gpt")
  result = example.main(num_windows=400, echo=_quiet)
  assert result["after"] < result["before"] - 0.5  # nats per character on the validation text
  assert set(result["batch_sizes"][:-1]) - {8}, "DiveBatch never resized in the epoch"
  assert sum(result["batch_sizes"]) == 400 and result["summary"]["epoch"] == 1  # each window once
  assert result["summary"]["decisions"] == result["steps"] // 25
  assert len(result["sample"]) == 121 and set(result["sample"]) <= set(data.tinyshakespeare_path().read_text())
