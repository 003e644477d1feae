"""What does the adaptive mechanism cost? SGD, AdaBatch and DiveBatch end to end.

Each method trains the same model on the same data through the CLI's loop
(``divebatch_jax.train.loop``: measured device batch, layouts without padding,
executables compiled ahead, statistics riding on the step in DiveBatch's
instrumented epochs). Then each adaptive run is replayed by a fixed-schedule run
(``policies.by_epoch``) that follows the same batch size per epoch without any
statistics: the replay's time is what the batch sizes alone cost, so

    mechanism cost = Σ_epochs adaptive train time / Σ_epochs replay train time

(first epochs, which hold the compile-ahead, excluded and reported apart). Per
epoch it records the train time relative to the replay's, the compile seconds on
the critical path (``compile_stall_s``), the padding fraction and examples/s; and
the first epoch after every resize against the steady epochs at that size.

    PYTHONPATH=. python benchmarks/end_to_end.py                        # CPU: CIFAR-10 subset, SmallCNN
    PYTHONPATH=. python benchmarks/end_to_end.py --dataset npz:/tmp/cifar10.npz --model resnet20 \\
        --num-examples 50000 --batch-size 128 --max-batch-size 2048 --epochs 8 --every 2   # GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
from common import machine, now

from divebatch_jax import policies
from divebatch_jax.train import loop, metrics
from divebatch_jax.train.config import TrainConfig

METHODS = ("sgd", "adabatch", "divebatch")


def config_from(args, method: str, out: Path) -> TrainConfig:
  return TrainConfig(
      dataset=args.dataset, model=args.model, method=method, epochs=args.epochs,
      batch_size=args.batch_size, max_batch_size=args.max_batch_size, lr=args.lr,
      num_examples=args.num_examples, num_test_examples=args.num_test_examples,
      delta=args.delta, resize_every=args.every, growth_every=args.every,
      schedule="cosine", device_batch=args.device_batch, checkpoint_every=10_000,
      progress=False, out=str(out), seed=args.seed, compilation_cache=str(args.compilation_cache),
  )


def run(config: TrainConfig, policy=None) -> list[dict]:
  shutil.rmtree(config.out, ignore_errors=True)
  loop.train_and_evaluate(config, echo=lambda line: print(f"  {line}", flush=True), policy=policy)
  return metrics.read_records(Path(config.out) / metrics.METRICS_FILE)


def after_resizes(records: list[dict]) -> list[dict]:
  """For each epoch that follows a resize: its time against the median of the later
  epochs at the same batch size (None when none follows)."""
  rows = []
  for i, r in enumerate(records[1:], start=1):
    if r["batch_size"] == records[i - 1]["batch_size"]:
      continue
    steady = [s["train_time_s"] for s in records[i + 1 :] if s["batch_size"] == r["batch_size"]]
    ratio = r["train_time_s"] / statistics.median(steady) if steady else None
    rows.append({"epoch": r["epoch"], "batch_size": r["batch_size"], "ratio": ratio})
  return rows


def compare(records: list[dict], replay: list[dict]) -> dict:
  later = slice(1, None)
  adaptive_time = sum(r["train_time_s"] for r in records[later])
  replay_time = sum(r["train_time_s"] for r in replay[later])
  return {
      "cost": adaptive_time / replay_time,
      "first_epoch": (records[0]["train_time_s"], replay[0]["train_time_s"]),
      "stall_after_first": sum(r["compile_stall_s"] for r in records[later]),
      "max_padding": max(r["padding_fraction"] for r in records),
  }




def to_markdown(args, command: str, runs: dict, replays: dict, elapsed: float) -> str:
  lines = [
      "# End to end: what the adaptive mechanism costs",
      "",
      f"- Command: `{command}`",
      f"- Machine: {machine()}",
      f"- Date: {now()}; whole run {elapsed:.0f} s",
      f"- {args.model} on {args.dataset} ({args.num_examples or 'all'} train / {args.num_test_examples or 'all'} test), "
      f"{args.epochs} epochs, b0 = {args.batch_size}, b_max = {args.max_batch_size}, lr {args.lr} cosine, "
      f"AdaBatch ×2 and DiveBatch δ = {args.delta} every {args.every} epochs; device batch "
      f"{args.device_batch or 'measured'}; one compilation cache shared by the runs (in the order sgd, "
      "adabatch, divebatch, replays). `replay`: a `policies.by_epoch` run with the adaptive run's batch "
      "size per epoch and no statistics. Epoch 1 holds the compile-ahead and is reported apart.",
      "",
      "## Summary",
      "",
      "| method | final acc | steps | train s (all) | epoch 1 s (replay) | cost vs replay, epochs 2+ | compile stall after epoch 1 (s) | max padding |",
      "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for method, records in runs.items():
    total = sum(r["train_time_s"] for r in records)
    row = f"| {method} | {100 * records[-1]['test_accuracy']:.2f}% | {records[-1]['total_steps']} | {total:.1f} | "
    if method in replays:
      c = compare(records, replays[method])
      row += (f"{c['first_epoch'][0]:.1f} ({c['first_epoch'][1]:.1f}) | {c['cost']:.3f} | "
              f"{c['stall_after_first']:.2f} | {100 * c['max_padding']:.1f}% |")
    else:
      row += (f"{records[0]['train_time_s']:.1f} | n/a | {sum(r['compile_stall_s'] for r in records[1:]):.2f} | "
              f"{100 * max(r['padding_fraction'] for r in records):.1f}% |")
    lines.append(row)
  lines += ["", "## First epoch after each resize, against the steady epochs at that size", "",
            "| method | epoch | batch | time / steady |", "|---|---:|---:|---:|"]
  for method, records in runs.items():
    for r in after_resizes(records):
      ratio = "n/a (no later epoch)" if r["ratio"] is None else f"{r['ratio']:.2f}"
      lines.append(f"| {method} | {r['epoch']} | {r['batch_size']} | {ratio} |")
  lines += ["", "## Per epoch", "",
            "| method | epoch | batch | device batch | train s | / replay | examples/s | compile stall s | compiles | padding |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for method, records in runs.items():
    replay = replays.get(method)
    for i, r in enumerate(records):
      ratio = "" if replay is None else f"{r['train_time_s'] / replay[i]['train_time_s']:.2f}"
      lines.append(
          f"| {method} | {r['epoch']} | {r['batch_size']} | {r['device_batch']} | {r['train_time_s']:.2f} | {ratio} | "
          f"{r['examples'] / r['train_time_s']:,.0f} | {r['compile_stall_s']:.2f} | {r['compilations']} | "
          f"{100 * r['padding_fraction']:.1f}% |"
      )
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", default="cifar10")
  parser.add_argument("--model", default="cnn")
  parser.add_argument("--num-examples", type=int, default=4000)
  parser.add_argument("--num-test-examples", type=int, default=1000)
  parser.add_argument("--epochs", type=int, default=12)
  parser.add_argument("--every", type=int, default=3, help="AdaBatch growth / DiveBatch resize period")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--max-batch-size", type=int, default=512)
  parser.add_argument("--device-batch", type=int, default=None, help="default: measured")
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--delta", type=float, default=0.03)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=Path, default=None)
  parser.add_argument("--compilation-cache", type=Path, default=None,
                      help="shared by the runs, as a user's reruns share it (default: a temporary folder)")
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  out = args.out or Path(__file__).parent / "results" / f"end_to_end_{'cpu' if backend == 'cpu' else 'gpu'}.md"
  command = "PYTHONPATH=. python benchmarks/end_to_end.py " + " ".join(sys.argv[1:] if argv is None else argv)
  work = Path(tempfile.mkdtemp(prefix="divebatch_e2e_"))
  args.compilation_cache = args.compilation_cache or work / "compilation_cache"
  start = time.perf_counter()
  runs, replays = {}, {}
  for method in METHODS:
    print(f"{method}:", flush=True)
    runs[method] = run(config_from(args, method, work / method))
  for method in METHODS[1:]:
    sizes = [r["batch_size"] for r in runs[method]]
    print(f"replay of {method}: {sizes}", flush=True)
    config = config_from(args, f"replay-{method}", work / f"replay_{method}")
    replays[method] = run(dataclasses.replace(config, method="sgd"), policy=policies.by_epoch(sizes))
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(to_markdown(args, command, runs, replays, time.perf_counter() - start))
  (out.with_suffix(".json")).write_text(json.dumps({"runs": runs, "replays": replays}, indent=1))
  shutil.rmtree(work, ignore_errors=True)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
