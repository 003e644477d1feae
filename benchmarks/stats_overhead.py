"""What per-example statistics cost next to a plain gradient step: time and compiled memory.

For each model of the CLI (SmallCNN; ResNet-20 with GroupNorm or LayerNorm; ResNet-18 with GroupNorm;
ResNet-18 with BatchNorm, whose statistics come from micro-batch gradients; a wide
MLP), all on 32x32x3 inputs and 10 classes, and for GPT-style transformers
(``tests/tiny_gpt.py``: token + position tables, pre-LN causal attention, GELU MLP,
head tied to the token table; 2 blocks, T = 128, vocabulary 256, width 128 or 256,
blocks unrolled or stacked and applied by ``nnx.scan``), and each batch size, it jits and times
on the same random batch what one micro-batch of the training engine computes
(``divebatch_jax.stats.micro_batch_sums``):

* ``plain``: loss and gradient sums (the plain step);
* ``auto``, ``exact``, ``ghost``, ``microbatch``: the same plus Σ||g_i||² by that
  method (what an instrumented DiveBatch / norm-test / noise-scale step adds);
  ``auto`` is what the CLI runs;
* ``auto +ip``: ``gradient_stats(method="auto")``, the full record with
  Σ<g_i, ḡ>² (from the same backward pass, about the batch's own mean ḡ; only the
  inner-product tests read it);
* ``auto +ip(d)``: the same with ``ip_direction=d`` (a previous step's mean
  gradient; here a params-shaped input): Σ<g_i, d>² from the same backward pass;

and reports the median wall time over ``--reps`` rounds (every variant once per
round, in turn, after one warm-up call each), the compiled peak memory
``argument + output + temp - alias`` from XLA's ``memory_analysis()``, and the
FLOPs and bytes accessed from XLA's ``cost_analysis()``, all as ratios to
``plain``. On a shared machine the time ratios are noisy; the memory and cost
analyses are properties of the compiled program and do not depend on the load. The cost model's decision for every layer (``describe()``)
is written under the table. Variants whose compiled peak exceeds ``--max-gib``
are compiled (memory reported) but not run.

Run from the repository root::

    PYTHONPATH=. python benchmarks/stats_overhead.py            # all, results/stats_overhead_<cpu|gpu>.md
    PYTHONPATH=. python benchmarks/stats_overhead.py --models cnn --batches 128 --reps 3 --out /tmp/x.md
    PYTHONPATH=. taskset -c 1 python benchmarks/stats_overhead.py --models gpt128 gpt128scan --batches 64 256
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import jax
from common import machine, now, rerun_command
import jax.numpy as jnp

from divebatch_jax import stats
from divebatch_jax.stats import microbatch, taps
from divebatch_jax.stats.ghost import sums as ghost_sums
from divebatch_jax.train import models

INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
# tests/tiny_gpt.py: the transformer the statistics tests check against brute force.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import tiny_gpt  # noqa: E402

GPT_VOCAB, GPT_CONTEXT, GPT_DEPTH = 256, 128, 2
MODELS = {
    "gpt128": dict(width=128, scan=False),
    "gpt128scan": dict(width=128, scan=True),
    "gpt256": dict(width=256, scan=False),
    "gpt256scan": dict(width=256, scan=True),
    "cnn": dict(name="cnn"),
    "resnet20gn": dict(name="resnet20", norm="group"),
    "resnet20ln": dict(name="resnet20", norm="layer"),
    "resnet18gn": dict(name="resnet18", norm="group"),
    "resnet18bn": dict(name="resnet18", norm="batch"),
    "mlp": dict(name="mlp", hidden_sizes=(1024, 1024)),
}
MODEL_LABELS = {
    "gpt128": "GPT d=128, 2 blocks unrolled, tied head",
    "gpt128scan": "GPT d=128, 2 blocks nnx.scan, tied head",
    "gpt256": "GPT d=256, 2 blocks unrolled, tied head",
    "gpt256scan": "GPT d=256, 2 blocks nnx.scan, tied head",
    "cnn": "SmallCNN (32/64/128)",
    "resnet20gn": "ResNet-20, GroupNorm",
    "resnet20ln": "ResNet-20, LayerNorm",
    "resnet18gn": "ResNet-18, GroupNorm",
    "resnet18bn": "ResNet-18, BatchNorm",
    "mlp": "MLP 3072-1024-1024-10",
}
VARIANTS = ("plain", "auto", "exact", "ghost", "microbatch", "auto +ip", "auto +ip(d)")
DEFAULT_MODELS = ("gpt128", "gpt128scan", "gpt256scan", "cnn", "resnet20gn", "resnet18gn", "resnet18bn", "mlp")


def step_fn(loss_fn, variant: str, batch_norm: bool):
  """The jitted step of one variant: (params, aux, batch, mask) -> outputs that are all used.

  BatchNorm models thread their running averages (``aux``) and have only the
  plain and micro-batch variants.
  """
  if variant.startswith("auto +ip"):
    given = variant == "auto +ip(d)"

    def full(params, aux, batch, mask):
      direction = jax.tree.map(lambda p: p.astype(jnp.float32), params) if given else None  # values do not matter
      loss, grad, record = stats.gradient_stats(loss_fn, params, batch, mask, method="auto", ip_direction=direction)
      return loss, grad, record.count, record.sum_sq, record.sum_ip  # sum_g = grad × count

    return jax.jit(full)
  method = None if variant == "plain" else variant
  if batch_norm and method == "auto":
    method = "microbatch"

  def step(params, aux, batch, mask):
    sums, aux = stats.micro_batch_sums(loss_fn, params, batch, mask, method=method, aux=aux)
    loss, grad = stats.mean_loss_and_grad(sums, params)
    sum_sq = microbatch.estimated_sum_sq(sums) if method == "microbatch" else sums.sum_sq
    return loss, grad, sums.count, sum_sq, aux

  return jax.jit(step)


def peak_bytes(compiled) -> int | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return (
      analysis.argument_size_in_bytes
      + analysis.output_size_in_bytes
      + analysis.temp_size_in_bytes
      - analysis.alias_size_in_bytes
  )


def cost(compiled) -> tuple[float | None, float | None]:
  """(FLOPs, bytes accessed) of a compiled step from XLA's cost analysis."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  if not analysis:
    return None, None
  return analysis.get("flops"), analysis.get("bytes accessed")


@contextlib.contextmanager
def batch_in_one_pass():
  """XLA's cost analysis counts a loop's body once, whatever its trip count. On XLA:CPU
  the product form loops over chunks of the batch (``ghost.forms._product_tap``); inside this
  context each such layer takes the whole batch as its one chunk, outside the loop: the
  same arithmetic (and the same choices, e.g. of where <g_i, ḡ> comes from), with FLOPs
  and bytes that the cost analysis counts in full."""
  chunk_size = ghost_sums._chunk_size
  ghost_sums._chunk_size = lambda batch, *args: None if chunk_size(batch, *args) is None else batch
  try:
    yield
  finally:
    ghost_sums._chunk_size = chunk_size


def measure(compilers: dict, args, reps: int, max_bytes: float) -> dict[str, dict]:
  """Per variant (a function that traces and compiles the step): compile (memory
  analysis; cost analysis, of the step compiled again :func:`batch_in_one_pass` where it
  has a loop on the CPU),
  one warm-up call; then ``reps`` rounds calling every variant once in turn, the median
  per variant.

  Interleaving spreads the machine's load over the variants alike. A variant whose
  compiled peak memory exceeds ``max_bytes`` is compiled but not run (time None).
  """
  results, steps = {}, {}
  for name, compile_step in compilers.items():
    start = time.perf_counter()
    step = compile_step()
    elapsed = time.perf_counter() - start
    if jax.default_backend() == "cpu" and "while" in step.as_text():  # it may loop over chunks
      with batch_in_one_pass():
        flops, accessed = cost(compile_step())
    else:
      flops, accessed = cost(step)
    results[name] = {"compile": elapsed, "bytes": peak_bytes(step), "time": None, "flops": flops, "accessed": accessed}
    if (results[name]["bytes"] or 0) <= max_bytes:
      steps[name] = step
      jax.block_until_ready(step(*args))  # warm-up
  times = {name: [] for name in steps}
  for _ in range(reps):
    for name, step in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(*args))
      times[name].append(time.perf_counter() - start)
  for name, samples in times.items():
    results[name]["time"] = statistics.median(samples)
  return results


def model_and_batch(key: str, batch_size: int):
  """``(loss_fn, params, aux, batch, parameter count, batch_norm)`` of one model."""
  spec = dict(MODELS[key])
  if key.startswith("gpt"):
    model = tiny_gpt.TinyGPT(GPT_VOCAB, GPT_CONTEXT, spec["width"], 4, GPT_DEPTH, scan=spec["scan"], rngs=tiny_gpt.nnx.Rngs(0))
    loss_fn, params = tiny_gpt.gpt_loss(model)
    return loss_fn, params, None, tiny_gpt.gpt_batch(batch_size, GPT_CONTEXT, GPT_VOCAB), models.param_count(params), False
  model = models.create_model(spec.pop("name"), input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, seed=0, **spec)
  graphdef, params, rest = models.split_model(model)
  batch_norm = models.uses_batch_norm(model)
  if batch_norm:
    loss_fn, aux = models.aux_loss_fn(graphdef), rest
  else:
    loss_fn, aux = models.per_example_loss_fn(graphdef, rest), None
  kx, ky = jax.random.split(jax.random.key(batch_size))
  batch = {
      "x": jax.random.normal(kx, (batch_size, *INPUT_SHAPE)),
      "y": jax.random.randint(ky, (batch_size,), 0, NUM_CLASSES),
  }
  return loss_fn, params, aux, batch, models.param_count(params), batch_norm






def run(model_keys, batch_sizes, reps, max_bytes, log, variants=VARIANTS) -> tuple[list[dict], dict]:
  rows, plans = [], {}
  for key in model_keys:
    for b in batch_sizes:
      loss_fn, params, aux, batch, n_params, batch_norm = model_and_batch(key, b)
      mask = jnp.ones((b,), bool)
      if batch_norm:
        auto = "microbatch"
        chosen = [v for v in variants if v in ("plain", "auto", "microbatch")]
      else:
        auto = stats.preferred_method(loss_fn, params, batch)
        plans[key] = taps.trace_plan(loss_fn, params, batch).describe()
        chosen = list(variants)
      args = (params, aux, batch, mask)
      compilers = {v: lambda v=v: step_fn(loss_fn, v, batch_norm).lower(*args).compile() for v in chosen}
      results = measure(compilers, args, reps, max_bytes)
      base = results["plain"]
      for variant, result in results.items():
        row = dict(model=key, batch=b, params=n_params, variant=variant, auto=auto, **result)
        row.update(ratios(result, base))
        rows.append(row)
        log(
            f"{key:10s} B={b:4d} {variant:12s} {fmt_ms(result['time'])} ms  x{fmt_ratio(row['time_ratio'])}  "
            f"mem {fmt_mib(result['bytes'])} MiB x{fmt_ratio(row['mem_ratio'])}  "
            f"flops x{fmt_ratio(row['flops_ratio'])}  bytes x{fmt_ratio(row['accessed_ratio'])}  compile {result['compile']:.1f} s"
        )
  return rows, plans


def ratios(result: dict, base: dict) -> dict:
  """A :func:`measure` result's time, memory, FLOPs and bytes as ratios to ``base``'s."""
  return {
      "time_ratio": ratio(result["time"], base["time"]),
      "mem_ratio": ratio(result["bytes"], base["bytes"]),
      "flops_ratio": ratio(result["flops"], base["flops"]),
      "accessed_ratio": ratio(result["accessed"], base["accessed"]),
  }


def ratio(a, b):
  return a / b if a and b else None


def fmt_ms(t):
  return "not run" if t is None else f"{1e3 * t:.1f}"


def fmt_mib(n):
  return "n/a" if n is None else f"{n / 2**20:.1f}"


def fmt_ratio(r, digits: int = 2):
  return "n/a" if r is None else f"{r:.{digits}f}"


def to_markdown(rows, plans, command: str, reps: int, max_gib: float, elapsed: float) -> str:
  autos = sorted({(r["model"], r["auto"]) for r in rows})
  lines = [
      "# Statistics overhead: time and compiled memory relative to a plain gradient step",
      "",
      f"- Command: `{command}`",
      f"- Machine: {machine()}",
      f"- Date: {now()}; "
      f"whole run {elapsed:.0f} s",
      f"- Inputs: random 32x32x3 images, 10 classes (GPTs: random token windows, T = {GPT_CONTEXT}, "
      f"vocabulary {GPT_VOCAB}), every row real; float32. Time: median of {reps} rounds, each calling every "
      "variant once in turn, after one warm-up call each. Memory: XLA `memory_analysis()` of the compiled step, "
      "argument + output + temp - alias. FLOPs and bytes: XLA `cost_analysis()` of the compiled step, "
      "compiled again with every example's gradient in one pass (on the CPU the product form loops over chunks "
      "of the batch, and the cost analysis counts a loop body once; a loop over layers, as in `nnx.scan`, is "
      "still counted once, in the plain step too). "
      "The machine may be shared: trust the memory, FLOPs and bytes ratios (properties of the compiled "
      "program) more than the time ratios.",
      f"- `auto +ip`: the full record with `sum_ip`. `not run`: compiled peak "
      f"above --max-gib {max_gib:g} GiB. `auto` chose: "
      + ", ".join(f"{m} -> {a}" for m, a in autos)
      + " (BatchNorm: micro-batch statistics, 8 groups). "
      f"The cost model's ρ (Gram form iff ρ·T·(C+F) <= C·F): {taps.gram_factor():g}.",
      "",
      "| model | params | batch | method | time (ms) | time / plain | memory (MiB) | memory / plain "
      "| FLOPs / plain | bytes / plain | compile (s) |",
      "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
        f"| {MODEL_LABELS[r['model']]} | {r['params']:,} | {r['batch']} | {r['variant']} | "
        f"{fmt_ms(r['time'])} | {fmt_ratio(r['time_ratio'])} | {fmt_mib(r['bytes'])} | "
        f"{fmt_ratio(r['mem_ratio'])} | {fmt_ratio(r['flops_ratio'], 3)} | {fmt_ratio(r['accessed_ratio'], 3)} | "
        f"{r['compile']:.1f} |"
    )
  lines += ["", "## The cost model's decision per layer (`taps.trace_plan(...).describe()`)", ""]
  for key, plan in plans.items():
    lines += [f"### {MODEL_LABELS[key]}", "", "| leaf | form |", "|---|---|"]
    lines += [f"| `{leaf}` | {how} |" for leaf, how in plan.items()]
    lines.append("")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(DEFAULT_MODELS))
  parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
  parser.add_argument("--batches", nargs="+", type=int, default=[128, 512])
  parser.add_argument("--reps", type=int, default=None, help="timed calls per variant (default 3 on CPU, 10 otherwise)")
  parser.add_argument("--max-gib", type=float, default=4.0, help="compile but do not run variants needing more (GiB)")
  parser.add_argument("--out", type=Path, default=None, help="markdown file (default results/stats_overhead_<cpu|gpu>.md)")
  parser.add_argument(
      "--gram-factor", type=float, default=None,
      help="the cost model's ρ for this run (default the backend's; 1e-6 puts every layer in the Gram form, 1e6 in the product form)",
  )
  args = parser.parse_args(argv)
  if any(b < 2 for b in args.batches):
    parser.error(f"--batches must be integers >= 2, got {args.batches}.")
  backend = jax.default_backend()
  if args.gram_factor is not None:
    if not args.gram_factor > 0:
      parser.error(f"--gram-factor must be > 0, got {args.gram_factor}.")
    taps.GRAM_COST_FACTOR[backend] = args.gram_factor
  reps = args.reps or (3 if backend == "cpu" else 10)
  if reps < 1:
    parser.error(f"--reps must be >= 1, got {reps}.")
  out = args.out or Path(__file__).parent / "results" / f"stats_overhead_{'cpu' if backend == 'cpu' else 'gpu'}.md"
  command = rerun_command("benchmarks/stats_overhead.py", argv)
  start = time.perf_counter()
  rows, plans = run(args.models, args.batches, reps, args.max_gib * 2**30, lambda line: print(line, flush=True), args.variants)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(to_markdown(rows, plans, command, reps, args.max_gib, time.perf_counter() - start))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
