"""AdamW inside optax.inject_hyperparams, the norm test deciding every 10 steps, and a
learning rate set each epoch from a Python float -- without a recompile and without a
silent rescale (``lr_rule`` is "none": the rate you set is the rate applied).

    python examples/adamw_norm_test.py
"""

from __future__ import annotations

import math

import optax

import divebatch_jax as dbj
from divebatch_jax import data, policies
from divebatch_jax.train import models


def main(epochs: int = 4, seed: int = 0, echo=print) -> tuple[list[dict], int]:
  train = data.digits("train")
  model = models.create_model("mlp", input_shape=(64,), num_classes=10, seed=seed)
  graphdef, params, rest = models.split_model(model)
  loss_fn = models.per_example_loss_fn(graphdef, rest)
  base_lr = 3e-3
  inner = optax.inject_hyperparams(optax.adamw)(learning_rate=base_lr, weight_decay=1e-4)
  policy = policies.norm_test(eta=0.5, max_batch_size=256, every=10)
  tx = dbj.adaptive_batch(inner, policy, num_examples=train.num_examples, base_batch_size=16)
  step = dbj.train_step(loss_fn, tx, policy=policy, method="auto")
  state = step.init(params)
  history = []
  with dbj.CompileCounter() as compiles, data.Pipeline(
      train, ladder=data.bucket_ladder(16, 256), seed=seed) as pipeline:
    for epoch in range(epochs):
      lr = base_lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))  # a Python float
      state = state._replace(opt_state=dbj.set_hyperparameter(state.opt_state, "learning_rate", lr))
      batch_size = dbj.current_batch_size(state.opt_state, epoch=epoch)
      for batch in pipeline.epoch(epoch, lambda: dbj.current_batch_size(state.opt_state)):
        state, _ = step.run(state, batch, epoch=epoch)  # the norm test: every step instrumented
      summary = dbj.batch_state_summary(state.opt_state)
      history.append({"epoch": epoch + 1, "batch_size": batch_size, "next_batch_size": summary["batch_size"],
                      "learning_rate": summary["learning_rate"], "lr_set": lr})
      echo(history[-1])
    # one step executable per layout: fused on GPU/TPU, accumulate (+ one apply) on the CPU
    return history, compiles.count_of("fused") + compiles.count_of("accumulate")


if __name__ == "__main__":
  main()
