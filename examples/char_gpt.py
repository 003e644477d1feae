"""A character GPT on tinyshakespeare in your own loop: the model, ``train_step``, the
pipeline, a warmup + cosine rate set every step, DiveBatch deciding every N steps,
evaluation in nats per character, and a few sampled lines at the end.

    python examples/char_gpt.py              # ~3 minutes on 2 CPU cores
    python examples/char_gpt.py --smoke      # seconds: a few hundred windows
"""

from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import divebatch_jax as dbj
from divebatch_jax import data, policies
from divebatch_jax.train import gpt, models


def evaluate(loss_fn, params, source, rows: int = 256) -> float:
  """Mean validation loss in nats per character over ``source``'s windows."""
  mean_loss = jax.jit(lambda p, b, m: jnp.sum(jnp.where(m, loss_fn(p, b), 0.0)))
  total = 0.0
  with data.Pipeline(source, ladder=data.bucket_ladder(rows, rows), shuffle=False, prefetch=0) as pipeline:
    for batch in pipeline.epoch(0, rows):
      (micro_batch, mask), = batch.micro_batches
      total += float(mean_loss(params, micro_batch, mask))
  return total / source.num_examples


def sample(graphdef, params, vocabulary, context: int, *, prompt: str = "\n", length: int = 200, seed: int = 0) -> str:
  """``length`` characters drawn from the model after ``prompt`` (temperature 1)."""
  logits_at = jax.jit(lambda p, x, t: nnx.merge(graphdef, p)(x)[0, t])
  ids = list(vocabulary.encode(prompt))
  key = jax.random.key(seed)
  for _ in range(length):
    window = ids[-context:]
    x = jnp.asarray([window + [0] * (context - len(window))], jnp.int32)
    key, draw = jax.random.split(key)
    ids.append(int(jax.random.categorical(draw, logits_at(params, x, len(window) - 1))))
  return vocabulary.decode(np.asarray(ids))


def main(*, num_windows: int | None = 8_000, context: int = 32, seed: int = 0, echo=print) -> dict:
  path = data.tinyshakespeare_path()
  train = data.text_windows(path, context)
  test = data.text_windows(path, context, split="validation")
  if num_windows is not None and num_windows < train.num_examples:  # a fixed token budget
    train = data.ArraySource({k: v[:num_windows] for k, v in train.arrays.items()}, num_classes=train.num_classes)
  n = train.num_examples
  model = gpt.GPT(gpt.GPT_SIZES["gpt"]._replace(context=context), vocab_size=test.num_classes, seed=seed)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(params, batch):  # per-window losses (B,): the mean over its tokens
    return models.cross_entropy(nnx.merge(graphdef, params)(batch["x"]), batch["y"])

  base_lr, warmup = 3e-3, 20
  inner = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.inject_hyperparams(optax.adamw)(learning_rate=base_lr, b1=0.9, b2=0.99, weight_decay=0.1),
  )
  policy = policies.divebatch(None, max_batch_size=128, first_resize=32, resize_every_steps=25)
  tx = dbj.adaptive_batch(inner, policy, num_examples=n, base_batch_size=8)
  step = dbj.train_step(loss_fn, tx, method="auto", policy=policy)
  state = step.init(params)  # init copies: `params` stays usable
  before = evaluate(loss_fn, params, test)
  sizes, steps, seen = [], 0, 0
  with data.Pipeline(train, ladder=data.bucket_ladder(8, 128), seed=seed) as pipeline:
    for batch in pipeline.epoch(0, lambda: dbj.current_batch_size(state.opt_state)):
      lr = base_lr * min(1.0, (steps + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * seen / n))
      state = state._replace(opt_state=dbj.set_hyperparameter(state.opt_state, "learning_rate", lr))
      state, out = step.run(state, batch, epoch=0)
      sizes.append(batch.num_real)
      steps, seen = steps + 1, seen + batch.num_real
  after = evaluate(loss_fn, state.params, test)
  echo(f"{n} windows of {context} characters, {steps} steps, batch sizes {sorted(set(sizes))}")
  echo(f"validation loss {before:.3f} -> {after:.3f} nats/char ({after / math.log(2):.3f} bits/char; "
       f"uniform: {math.log(test.num_classes):.3f})")
  text = sample(graphdef, state.params, test.vocabulary, context, length=120, seed=seed)
  echo(text)
  return {"before": before, "after": after, "steps": steps, "batch_sizes": sizes, "sample": text,
          "summary": dbj.batch_state_summary(state.opt_state)}


if __name__ == "__main__":
  main(num_windows=400 if "--smoke" in sys.argv else 8_000)
