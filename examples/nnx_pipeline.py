"""A Flax nnx model, the data pipeline and the ready-made step: the CLI's engine in a few lines.

``dbj.train_step`` builds the jitted step (plain, or instrumented in the policy's
window; one executable per micro-batch shape); ``step.run`` takes a pipeline batch of
any number of micro-batches (one fused call on GPU/TPU, ``step.accumulate`` per
micro-batch then ``step.apply`` on the CPU), as the CLI does. This reproduces
``divebatch-train --dataset digits --model mlp`` with the same flags exactly (see
tests/test_examples.py).

    python examples/nnx_pipeline.py
"""

from __future__ import annotations

import optax

import divebatch_jax as dbj
from divebatch_jax import data, policies
from divebatch_jax.train import models


def main(epochs: int = 6, seed: int = 0, device_batch: int = 64, echo=print) -> list[dict]:
  train = data.digits("train")
  model = models.create_model("mlp", input_shape=(64,), num_classes=10, seed=seed)
  graphdef, params, rest = models.split_model(model)
  loss_fn = models.per_example_loss_fn(graphdef, rest)  # per-example losses of an nnx model
  inner = optax.chain(optax.add_decayed_weights(5e-4), optax.inject_hyperparams(optax.sgd)(0.05, momentum=0.9))
  policy = policies.divebatch(0.1, 512, resize_every=2)
  tx = dbj.adaptive_batch(inner, policy, num_examples=train.num_examples, base_batch_size=16)
  step = dbj.train_step(loss_fn, tx, method="auto")
  state = step.init(params)
  history = []
  with data.Pipeline(train, ladder=data.bucket_ladder(16, device_batch), seed=seed) as pipeline:
    for epoch in range(epochs):
      batch_size = dbj.current_batch_size(state.opt_state, epoch=epoch)
      for batch in pipeline.epoch(epoch, batch_size):
        state, _ = step.run(state, batch, epoch=epoch)
      summary = dbj.batch_state_summary(state.opt_state)
      history.append({"epoch": epoch + 1, "batch_size": batch_size, "next_batch_size": summary["batch_size"],
                      "statistic": summary["statistic"], "learning_rate": summary["learning_rate"]})
      echo(history[-1])
  return history


if __name__ == "__main__":
  main()
