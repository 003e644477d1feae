"""Does the host pipeline keep up with the training step?

For each batch size b, one run measures three rates in examples/s:

* ``pipeline``: what :class:`divebatch_jax.data.Pipeline` delivers on its own
  (CIFAR-10 in memory, random crop + flip, bucket padding, prefetch thread,
  transfer to the device), the consumer only waiting for each batch;
* ``step``: what a jitted training step consumes from a batch already on the
  device (SmallCNN from ``divebatch_jax.train.models``, SGD on the plain
  gradient of :func:`divebatch_jax.stats.microbatch.accumulate_gradients`);
* ``together``: the step fed by the pipeline, as in training; ``host_wait`` is
  the share of that time the loop spent waiting for a batch.

``--data random`` replaces the CIFAR-10 pixels by random uint8 images of the same
shape (for machines without ``../shared/data``): every stage costs the same.

The pipeline keeps up when ``pipeline`` exceeds ``step`` (then ``together`` is
close to ``step``). Results go to ``benchmarks/results/pipeline.json`` (one
entry per device, with the command) and ``benchmarks/results/pipeline.md``.

    python benchmarks/pipeline.py --split "train[:20000]" --batch-sizes 128,512,2048
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

import optax

from divebatch_jax import policies
from divebatch_jax.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ArraySource,
    CropFlip,
    ImagePreprocess,
    Pipeline,
    bucket_ladder,
    cifar10,
    padding_fraction,
)
from divebatch_jax.train import models
from divebatch_jax.transform import TrainStep, adaptive_batch

RESULTS = Path(__file__).resolve().parent / "results"


def _engine(loss_fn, num_examples: int):
  """The CLI's step: TrainStep with plain SGD (constant policy), one call per micro-batch."""
  tx = adaptive_batch(optax.sgd(0.01), policies.constant(), num_examples=num_examples, base_batch_size=1)
  return TrainStep(loss_fn, tx, policy=tx.policy)


def _rate(run_one, finish, args) -> float:
  """examples/s of ``run_one() -> examples`` repeated for at least ``args.seconds`` and
  ``args.min_steps`` calls, ``finish()`` (waiting for the device) included."""
  examples, steps, start = 0, 0, time.perf_counter()
  while steps < args.min_steps or time.perf_counter() - start < args.seconds:
    examples += run_one()
    steps += 1
  finish()
  return examples / (time.perf_counter() - start)


def load(args) -> tuple[ArraySource, str]:
  """The in-memory training images and a description of them."""
  start = time.perf_counter()
  if args.data == "cifar10":
    source = cifar10(args.split, args.data_dir)
    return source, f"cifar10 {args.split}: {source.num_examples} images, decoded in {time.perf_counter() - start:.1f} s"
  rng = np.random.default_rng(0)
  arrays = {"x": rng.integers(0, 256, (args.num_random, 32, 32, 3), np.uint8), "y": rng.integers(0, 10, args.num_random)}
  source = ArraySource(arrays, num_classes=10, preprocess=ImagePreprocess(CIFAR10_MEAN, CIFAR10_STD))
  return source, f"random uint8 images (32, 32, 3), {args.num_random} in memory (--data random)"


def _wait(batch) -> None:
  jax.block_until_ready([d for d, _ in batch.micro_batches])


def measure(source, batch_size: int, args, step, state, resident: bool) -> dict:
  ladder = bucket_ladder(args.min_bucket, args.max_device_batch)

  def new_pipeline():
    return Pipeline(
        source, ladder=ladder, seed=0, augment=CropFlip(), prefetch=args.prefetch, workers=args.workers,
        resident=resident,
    )

  with new_pipeline() as pipeline:  # the pipeline alone
    for _ in range(2):
      _wait(pipeline.next_batch(batch_size))

    def fetch():
      batch = pipeline.next_batch(batch_size)
      _wait(batch)
      return batch.num_real

    pipeline_rate = _rate(fetch, lambda: None, args)
    batch = pipeline.next_batch(batch_size)

  holder = {"state": state}
  finish = lambda: jax.block_until_ready(holder["state"].params)
  holder["state"], _ = step.run(holder["state"], batch, stats=False)  # compile
  finish()

  def compute():  # the step alone, on a batch already on the device
    holder["state"], _ = step.run(holder["state"], batch, stats=False)
    return batch.num_real

  step_rate = _rate(compute, finish, args)

  with new_pipeline() as pipeline:  # both, as in training
    _wait(pipeline.next_batch(batch_size))
    waited = [0.0]

    def train():
      t = time.perf_counter()
      batch = pipeline.next_batch(batch_size)
      waited[0] += time.perf_counter() - t
      holder["state"], _ = step.run(holder["state"], batch, stats=False)
      return batch.num_real

    start = time.perf_counter()
    together_rate = _rate(train, finish, args)
    total = time.perf_counter() - start
  k, m = ladder.shape_for(batch_size)
  return {
      "batch_size": batch_size,
      "resident": resident,
      "layout": [k, m],
      "padding_fraction": round(padding_fraction(ladder, batch_size), 4),
      "pipeline_examples_per_s": round(pipeline_rate, 1),
      "step_examples_per_s": round(step_rate, 1),
      "together_examples_per_s": round(together_rate, 1),
      "host_wait_fraction": round(waited[0] / total, 3),
      "pipeline_over_step": round(pipeline_rate / step_rate, 2),
  }, holder["state"]


def _device_name() -> str:
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"cpu ({os.cpu_count()} cores visible, {platform.processor() or platform.machine()})"
  return f"{device.platform} {device.device_kind} (host: {os.cpu_count()} cores)"


def _write(run: dict, results: Path) -> None:
  results.mkdir(parents=True, exist_ok=True)
  path = results / "pipeline.json"
  runs = json.loads(path.read_text()) if path.exists() else {}
  runs[run["device"]] = run
  path.write_text(json.dumps(runs, indent=2) + "\n")
  lines = [
      "# Pipeline throughput vs training-step throughput",
      "",
      "Written by `benchmarks/pipeline.py`; examples/s. `pipeline`: the pipeline alone (CIFAR-10 in",
      "memory, crop+flip, micro-batches, prefetch, device); `data`: `device` when the data set is held",
      "on the device and gathered by index there, `host` when the host reads and sends every row;",
      "`step`: the CLI's engine (TrainStep, SmallCNN, SGD; one fused call per step of one micro-batch",
      "on GPU/TPU, accumulate + apply calls on the CPU and for larger steps) on batches already",
      "on the device; `together`: the step fed by the pipeline; `wait`: share of that time spent",
      "waiting for a batch. Runs before the engine rewrite (code before b333ae8) have no `data` column.",
      "",
  ]
  for device, r in runs.items():
    lines += [
        f"## {device}",
        "",
        f"`{r['command']}` ({r['date']}, code {r.get('commit', 'unknown')}, jax {r['jax']}, {r['data']}, buckets {r['buckets']}, "
        f"prefetch {r['prefetch']}, workers {r['workers']}, {r['model']})",
        "",
        "| batch | data | layout (K, m) | padding | pipeline | step | together | wait | pipeline / step |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in r["results"]:
      data = {True: "device", False: "host"}.get(m.get("resident"), "host")
      lines.append(
          f"| {m['batch_size']} | {data} | {tuple(m['layout'])} | {m['padding_fraction']:.1%} | "
          f"{m['pipeline_examples_per_s']:,.0f} | {m['step_examples_per_s']:,.0f} | "
          f"{m['together_examples_per_s']:,.0f} | {m['host_wait_fraction']:.0%} | {m['pipeline_over_step']} |"
      )
    lines.append("")
  (results / "pipeline.md").write_text("\n".join(lines))


def _commit() -> str:
  """The checked-out commit (with "+changes" when the tree differs from it)."""
  root = Path(__file__).resolve().parents[1]
  try:
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "divebatch_jax", "benchmarks/pipeline.py"], capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown (no git checkout)"
  return head + ("+changes" if dirty else "")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", choices=("cifar10", "random"), default="cifar10")
  parser.add_argument("--split", default="train[:20000]", help="CIFAR-10 split held in memory")
  parser.add_argument("--num-random", type=int, default=20000, help="images for --data random")
  parser.add_argument("--data-dir", default=None, help="TFDS folder (default ../shared/data/tfds)")
  parser.add_argument("--batch-sizes", default="128,512,2048")
  parser.add_argument("--min-bucket", type=int, default=128)
  parser.add_argument("--max-device-batch", type=int, default=512, help="larger batches are accumulated")
  parser.add_argument("--prefetch", type=int, default=4, help="batches prepared ahead")
  parser.add_argument("--workers", type=int, default=4, help="threads preparing batches")
  parser.add_argument("--seconds", type=float, default=3.0, help="minimum time per measurement")
  parser.add_argument("--min-steps", type=int, default=3)
  parser.add_argument("--results-dir", type=Path, default=RESULTS, help="merges into pipeline.json there")
  parser.add_argument("--no-write", action="store_true", help="print only")
  args = parser.parse_args(argv)

  source, data = load(args)
  model = models.create_model("cnn", input_shape=(32, 32, 3), num_classes=10, seed=0)
  graphdef, params, rest = models.split_model(model)
  step = _engine(models.per_example_loss_fn(graphdef, rest), source.num_examples)
  state = step.init(params)
  sizes = [int(b) for b in args.batch_sizes.split(",")]
  results = []
  for b in sizes:
    for resident in (True, False):
      result, state = measure(source, b, args, step, state, resident)
      results.append(result)
      print(json.dumps(results[-1]), flush=True)
  run = {
      "device": _device_name(),
      "command": "python benchmarks/pipeline.py " + shlex.join(sys.argv[1:] if argv is None else argv),
      "date": datetime.date.today().isoformat(),
      "commit": _commit(),
      "jax": jax.__version__,
      "data": data,
      "buckets": list(bucket_ladder(args.min_bucket, args.max_device_batch).sizes),
      "prefetch": args.prefetch,
      "workers": args.workers,
      "model": f"SmallCNN, {models.param_count(params)} parameters",
      "results": results,
  }
  if not args.no_write:
    _write(run, args.results_dir)
  return run


if __name__ == "__main__":
  main()
