"""How should a step of b examples run on this backend: one batch of b, or K micro-batches of m?

For each model (the CLI's SmallCNN and ResNet-20 with GroupNorm, optionally
ResNet-18), on random 32x32x3 data already on the device, it measures a plain SGD
step (masked mean loss, ``value_and_grad``, ``p - lr·g``):

* ``single``: one batch of b rows, for each b of ``--batches``: compile seconds
  and examples/s, i.e. what a new batch shape costs and how throughput depends
  on the device batch;
* ``unrolled`` / ``scan`` / ``loop``: b = K·m rows as K micro-batches of m, summed
  in a Python-unrolled loop, a ``lax.scan``, or a ``lax.fori_loop`` whose trip
  count is an argument. One ``loop`` executable compiled for K_max micro-batches
  serves every K ≤ K_max (the rows past K·m are never read), so a batch-size
  change needs no compilation;
* ``engine``: the CLI's own step (``TrainStep.run``: one fused
  call per step of one micro-batch on GPU/TPU, accumulate calls + apply on the CPU
  and for larger steps) at K = 1 and K = K_max micro-batches of m, SGD, no statistics.

It answers which micro-batch size m maximises examples/s and whether a loop over
micro-batches runs as fast as unrolled code on this backend (XLA:CPU runs
convolutions inside loop bodies slowly, jax#12868).

    PYTHONPATH=. python benchmarks/device_batch.py --out results/device_batch_gpu.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
from common import machine, now
import jax.numpy as jnp
import optax

import divebatch_jax as dbj
from divebatch_jax import policies
from divebatch_jax.train import models

INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
MODELS = {
    "cnn": ("SmallCNN", dict(name="cnn")),
    "resnet20": ("ResNet-20 GroupNorm", dict(name="resnet20", norm="group")),
    "resnet18": ("ResNet-18 GroupNorm", dict(name="resnet18", norm="group")),
}
LR = 0.01


def micro_sums(loss_fn, params, batch, mask):
  def summed(p):
    return jnp.sum(jnp.where(mask, loss_fn(p, batch), 0.0))

  return jax.value_and_grad(summed)(params)


def sgd(params, grad_sum, count):
  return jax.tree.map(lambda p, g: p - LR * g / count, params, grad_sum)


def single_step(loss_fn):
  def step(params, batch, mask):
    loss, grad = micro_sums(loss_fn, params, batch, mask)
    return sgd(params, grad, jnp.sum(mask)), loss

  return step


def micro_step(loss_fn, how: str):
  """A step over a (K_max, m) layout; ``k`` micro-batches are used (all of them unless ``loop``)."""

  def step(params, batch, mask, k):
    zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))

    def add(i, carry):
      part = jax.tree.map(lambda x: x[i], batch)
      loss, grad = micro_sums(loss_fn, params, part, mask[i])
      return carry[0] + loss, jax.tree.map(jnp.add, carry[1], grad)

    k_max = mask.shape[0]
    if how == "unrolled":
      carry = zero
      for i in range(k_max):
        carry = add(i, carry)
    elif how == "scan":
      carry, _ = jax.lax.scan(lambda c, i: (add(i, c), None), zero, jnp.arange(k_max))
    else:
      carry = jax.lax.fori_loop(0, k, add, zero)
    count = jnp.sum(jnp.where(jnp.arange(k_max)[:, None] < k, mask, False))
    return sgd(params, carry[1], count), carry[0]

  return step


def data(shape_prefix):
  kx, ky = jax.random.split(jax.random.key(0))
  return {
      "x": jax.random.normal(kx, (*shape_prefix, *INPUT_SHAPE)),
      "y": jax.random.randint(ky, shape_prefix, 0, NUM_CLASSES),
  }


def timed(compiled, args, seconds: float) -> float:
  """Seconds per call: one warm-up, then calls for at least ``seconds`` (at least 3)."""
  jax.block_until_ready(compiled(*args))
  calls, start = 0, time.perf_counter()
  while calls < 3 or time.perf_counter() - start < seconds:
    out = compiled(*args)
    calls += 1
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def engine_timed(loss_fn, params, m: int, k: int, seconds: float) -> tuple[float, float]:
  """(seconds to the first step, seconds per step) of the CLI's engine on K micro-batches of m."""
  tx = dbj.adaptive_batch(optax.sgd(LR), policies.constant(), num_examples=10**9, base_batch_size=m * k)
  step = dbj.train_step(loss_fn, tx, method="auto")
  state = step.init(params)
  batch = data((k, m))
  micro = [({"x": batch["x"][i], "y": batch["y"][i]}, jnp.ones((m,), bool)) for i in range(k)]
  layout = type("Batch", (), {"micro_batches": micro})()
  run = lambda state: step.run(state, layout, stats=False)[0]
  start = time.perf_counter()
  state = jax.block_until_ready(run(state))
  first = time.perf_counter() - start
  calls, start = 0, time.perf_counter()
  while calls < 3 or time.perf_counter() - start < seconds:
    state = run(state)
    calls += 1
  jax.block_until_ready(state)
  return first, (time.perf_counter() - start) / calls


def compile_timed(fn, args):
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def run(model_keys, batches, micro, k_max, seconds, log) -> list[dict]:
  rows = []
  for key in model_keys:
    label, spec = MODELS[key]
    spec = dict(spec)
    model = models.create_model(spec.pop("name"), input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, seed=0, **spec)
    graphdef, params, rest = models.split_model(model)
    loss_fn = models.per_example_loss_fn(graphdef, rest)

    def record(variant, m, k, compile_s, per_call):
      row = dict(model=label, variant=variant, m=m, k=k, batch=m * k, compile=compile_s,
                 ms=1e3 * per_call, rate=m * k / per_call)
      rows.append(row)
      log(f"{label:20s} {variant:9s} m={m:5d} K={k:2d} compile {compile_s:5.1f} s  "
          f"{row['ms']:8.2f} ms  {row['rate']:9.0f} ex/s")

    for b in batches:
      args = (params, data((b,)), jnp.ones((b,), bool))
      compiled, c = compile_timed(single_step(loss_fn), args)
      record("single", b, 1, c, timed(compiled, args, seconds))
    for m in micro:
      layout = (params, data((k_max, m)), jnp.ones((k_max, m), bool))
      for how in ("unrolled", "scan"):
        args = (*layout, jnp.int32(k_max))
        compiled, c = compile_timed(micro_step(loss_fn, how), args)
        record(how, m, k_max, c, timed(compiled, args, seconds))
      compiled, c = compile_timed(micro_step(loss_fn, "loop"), (*layout, jnp.int32(k_max)))
      for k in sorted({1, 2, k_max}):
        record("loop", m, k, c if k == 1 else 0.0, timed(compiled, (*layout, jnp.int32(k)), seconds))
      for k in sorted({1, k_max}):
        record("engine", m, k, *engine_timed(loss_fn, params, m, k, seconds))
  return rows


def to_markdown(rows, command: str, elapsed: float) -> str:
  lines = [
      "# Device batch: examples/s of a plain SGD step by layout, and compile seconds per shape",
      "",
      f"- Command: `{command}`",
      f"- Machine: {machine()}",
      f"- Date: {now()}; whole run {elapsed:.0f} s",
      "- Random 32x32x3 inputs on the device, float32. `loop` rows share one executable "
      "(compiled for the largest K; its compile time is on the K = 1 row). `engine` rows: the "
      "compile column is the first step (compiles and one run).",
      "",
      "| model | variant | m | K | batch | compile (s) | ms / step | examples/s |",
      "|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
        f"| {r['model']} | {r['variant']} | {r['m']} | {r['k']} | {r['batch']} | {r['compile']:.1f} | "
        f"{r['ms']:.2f} | {r['rate']:,.0f} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["cnn", "resnet20"])
  parser.add_argument("--batches", nargs="+", type=int, default=[32, 64, 128, 256, 512, 1024])
  parser.add_argument("--micro", nargs="+", type=int, default=[128], help="micro-batch sizes m")
  parser.add_argument("--k-max", type=int, default=4)
  parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
  parser.add_argument("--out", type=Path, default=None)
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  out = args.out or Path(__file__).parent / "results" / f"device_batch_{'cpu' if backend == 'cpu' else 'gpu'}.md"
  command = "PYTHONPATH=. python benchmarks/device_batch.py " + " ".join(sys.argv[1:] if argv is None else argv)
  start = time.perf_counter()
  rows = run(args.models, args.batches, args.micro, args.k_max, args.seconds, lambda s: print(s, flush=True))
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(to_markdown(rows, command, time.perf_counter() - start))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
