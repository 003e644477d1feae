"""Which per-example norm form should a dense layer on a sequence use? The cost model's ρ for attention and MLP layers.

A transformer's projections and MLP apply a (C, F) kernel to the T tokens of each
example. :mod:`divebatch_jax.stats.taps` computes ||g_i||² for such a layer in the Gram
form (ρ·T²·(C+F) work, besides the ordinary kernel gradient) or the product form
(T·C·F work, which is also the kernel gradient) and picks "gram" iff
ρ·T·(C+F) <= C·F. This script times the library's own taps on a pre-LN MLP block
(``x + W2·gelu(W1·LN(x))``, D -> 4D -> D) and on a square projection (D -> D), for
sequence lengths T at a fixed number of tokens per batch, with every layer forced
into one form (ρ set to 1e-6 or 1e6), beside the plain gradient step:

* ``plain``: loss and summed gradient (``stats.micro_batch_sums(method=None)``);
* ``gram`` / ``product``: the same plus Σ||g_i||² by ghost norms in that form;
* ``product, one pass`` (CPU): the product form with every example's gradient formed at
  once, without the loop over chunks of the batch that XLA:CPU runs
  (``stats_overhead.batch_in_one_pass``).

It reports time, compiled memory, FLOPs and bytes (XLA's analyses) as ratios to
``plain``; the sequence length where the faster form changes calibrates ρ
(:data:`divebatch_jax.stats.taps.GRAM_COST_FACTOR`).

    PYTHONPATH=. taskset -c 1 python benchmarks/sequence_forms.py --out benchmarks/results/sequence_forms_cpu.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from common import machine, now, rerun_command

from divebatch_jax import stats
from divebatch_jax.stats import taps
from stats_overhead import batch_in_one_pass, measure, ratios

LAYERS = ("mlp", "proj")


def layer_loss(kind: str, width: int):
  """``(loss_fn, params)`` of one layer kind on (B, T, width) token rows."""
  keys = jax.random.split(jax.random.key(0), 3)
  if kind == "mlp":
    params = {
        "scale": jnp.ones((width,)),
        "w1": jax.random.normal(keys[0], (width, 4 * width)) / width**0.5,
        "w2": jax.random.normal(keys[1], (4 * width, width)) / (4 * width) ** 0.5,
    }

    def loss_fn(p, batch):
      x = batch["x"]
      h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * p["scale"]
      out = x + jax.nn.gelu(h @ p["w1"]) @ p["w2"]
      return jnp.mean((out - batch["y"]) ** 2, axis=(1, 2))

  else:
    params = {"w": jax.random.normal(keys[0], (width, width)) / width**0.5}

    def loss_fn(p, batch):
      return jnp.mean((jnp.tanh(batch["x"] @ p["w"]) - batch["y"]) ** 2, axis=(1, 2))

  return loss_fn, params


def step(loss_fn, form: str | None):
  """The jitted step: plain sums, or with Σ||g_i||² by ghost norms in ``form``."""

  def run(params, batch, mask):
    sums, _ = stats.micro_batch_sums(loss_fn, params, batch, mask, method=None if form is None else "ghost")
    return sums.loss_sum, sums.sum_g, sums.sum_sq

  return jax.jit(run)


def forced(form: str | None, fn):
  """Compile ``fn`` with every tapped layer in ``form`` (ρ at an extreme on this backend)."""
  if form is None:
    return fn()
  backend = jax.default_backend()
  factor = taps.gram_factor(backend)
  taps.GRAM_COST_FACTOR[backend] = 1e-6 if form == "gram" else 1e6
  try:
    return fn()
  finally:
    taps.GRAM_COST_FACTOR[backend] = factor


def one_pass(compile_step):
  with batch_in_one_pass():
    return compile_step()


def run(layers, lengths, widths, tokens, reps, log) -> list[dict]:
  rows = []
  for kind in layers:
    for width in widths:
      for t in lengths:
        b = max(2, tokens // t)
        loss_fn, params = layer_loss(kind, width)
        kx, ky = jax.random.split(jax.random.key(t))
        batch = {"x": jax.random.normal(kx, (b, t, width)), "y": jax.random.normal(ky, (b, t, width))}
        mask = jnp.ones((b,), bool)
        compilers = {
            form or "plain": lambda f=form: forced(f, lambda: step(loss_fn, f).lower(params, batch, mask).compile())
            for form in (None, "gram", "product")
        }
        if jax.default_backend() == "cpu":  # the product form without its loop over chunks of the batch
          compilers["product, one pass"] = lambda: one_pass(compilers["product"])
        results = measure(compilers, (params, batch, mask), reps, float("inf"))
        base = results["plain"]
        for form, r in results.items():
          row = dict(layer=kind, width=width, T=t, batch=b, form=form, **r, **ratios(r, base))
          rows.append(row)
          log(f"{kind:5s} D={width:4d} T={t:5d} B={b:4d} {form:8s} {1e3 * r['time']:8.1f} ms x{row['time_ratio']:.2f} "
              f"mem x{row['mem_ratio']:.2f} flops x{row['flops_ratio']:.2f} bytes x{row['accessed_ratio']:.2f}")
  return rows


def to_markdown(rows, command: str, elapsed: float, tokens: int) -> str:
  lines = [
      "# Gram or product form for dense layers on sequences (the cost model's ρ)",
      "",
      f"- Command: `{command}`",
      f"- Machine: {machine()}",
      f"- Date: {now()}; whole run {elapsed:.0f} s",
      f"- Batches of {tokens} tokens (B = tokens / T), float32, every row real. `mlp`: pre-RMS-norm "
      "residual MLP D -> 4D -> D (two kernels, C·F = 4D²); `proj`: one D -> D kernel. Ratios to the plain "
      "gradient step in the same run (time: median of the rounds; memory: compiled peak; FLOPs, bytes: XLA's "
      "cost analysis, of the step compiled with every example's gradient in one pass, "
      "`stats_overhead.batch_in_one_pass`). Each layer is forced into one form; the cost model's rule is gram iff "
      "ρ·T·(C+F) <= C·F, i.e. T <= C·F / (ρ·(C+F)).",
      "",
      "| layer | D | T | B | form | time (ms) | time / plain | memory / plain | FLOPs / plain | bytes / plain |",
      "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
  ]
  fmt = lambda r: "n/a" if r is None else f"{r:.2f}"
  for r in rows:
    lines.append(
        f"| {r['layer']} | {r['width']} | {r['T']} | {r['batch']} | {r['form']} | {1e3 * r['time']:.1f} | "
        f"{fmt(r['time_ratio'])} | {fmt(r['mem_ratio'])} | {fmt(r['flops_ratio'])} | {fmt(r['accessed_ratio'])} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", nargs="+", choices=LAYERS, default=list(LAYERS))
  parser.add_argument("--lengths", nargs="+", type=int, default=[8, 16, 32, 64, 128, 256, 512, 1024])
  parser.add_argument("--widths", nargs="+", type=int, default=[128, 256])
  parser.add_argument("--tokens", type=int, default=8192, help="tokens per batch (B = tokens / T)")
  parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 3 on CPU, 10 otherwise)")
  parser.add_argument("--out", type=Path, default=None)
  args = parser.parse_args(argv)
  if any(t < 1 for t in args.lengths) or any(w < 1 for w in args.widths) or args.tokens < 2:
    parser.error("--lengths, --widths must be positive and --tokens >= 2.")
  reps = args.reps or (3 if jax.default_backend() == "cpu" else 10)
  command = rerun_command("benchmarks/sequence_forms.py", argv)
  start = time.perf_counter()
  rows = run(args.layers, args.lengths, args.widths, args.tokens, reps, lambda line: print(line, flush=True))
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_markdown(rows, command, time.perf_counter() - start, args.tokens))
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
