"""DiveBatch in a hand-written optax loop with a flax.linen model.

The pieces by hand: ``gradient_stats`` in the policy's instrumented epochs, the
plain masked gradient otherwise, ``tx.update(..., stats=)`` or ``count=`` (the
step's real rows, so the transformation counts epochs exactly), and the batch
size read once per epoch with ``epoch=`` (drift between this loop and the
transformation's count would raise there). The data pipeline serves each step
as one micro-batch here (its largest layout is b_max).

    python examples/linen_optax.py
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import divebatch_jax as dbj
from divebatch_jax import data, policies


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


def main(epochs: int = 6, seed: int = 0, echo=print, stats_every_step: bool = False) -> list[dict]:
  train = data.digits("train")
  model = MLP()
  params = model.init(jax.random.key(seed), jnp.zeros((1, 64)))

  def loss_fn(params, batch):  # per-example losses, shape (B,)
    logits = model.apply(params, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

  b0, b_max = 16, 256
  policy = policies.divebatch(None, b_max, resize_every=2, first_resize=64)
  tx = dbj.adaptive_batch(optax.sgd(0.05, momentum=0.9), policy, num_examples=train.num_examples,
                          base_batch_size=b0)  # lr_rule defaults to "none": the rate stays 0.05
  opt_state = tx.init(params)

  @jax.jit
  def plain_step(params, opt_state, batch, mask):
    loss_sum, grad_sum, count = dbj.masked_loss_and_grad(loss_fn, params, batch, mask)
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1), grad_sum)
    updates, opt_state = tx.update(grads, opt_state, params, count=count)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def stats_step(params, opt_state, batch, mask):
    _, grads, stats = dbj.gradient_stats(loss_fn, params, batch, mask, method="auto")
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state

  history = []
  with data.Pipeline(train, ladder=data.bucket_ladder(b0, b_max), seed=seed) as pipeline:
    for epoch in range(epochs):
      batch_size = dbj.current_batch_size(opt_state, epoch=epoch)
      # Statistics outside the policy's window are ignored by it: passing them on every
      # step (stats_every_step) gives the same run, at the cost of the statistics.
      step = stats_step if stats_every_step or policy.needs_stats(epoch) else plain_step
      for batch in pipeline.epoch(epoch, batch_size):
        (micro_batch, mask), = batch.micro_batches  # one micro-batch: b <= the largest layout
        params, opt_state = step(params, opt_state, micro_batch, mask)
      summary = dbj.batch_state_summary(opt_state)
      history.append({"epoch": epoch + 1, "batch_size": batch_size, "next_batch_size": summary["batch_size"],
                      "statistic": summary["statistic"], "lr_scale": summary["lr_scale"]})
      echo(history[-1])
  return history


if __name__ == "__main__":
  main()
