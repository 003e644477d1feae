"""Which per-example gradient-norm form is cheapest for a convolution of a given shape?

For a 3x3 convolution (NHWC input ``(B, H, W, C)``, kernel ``(3, 3, C, F)``,
output cotangent ``Y`` of ``(B, T, F)``, ``T = H'·W'``, unfolded input patches
``P`` of ``(B, T, 9C)``) every form below returns the summed kernel gradient and
the per-example squared norms ``||g_i||² = ||P_iᵀ Y_i||²``:

* ``plain``: the summed kernel gradient alone (the convolution's own transpose),
  the reference every other form is divided by;
* ``gram``: norms from Gram matrices ``<P_i P_iᵀ, Y_i Y_iᵀ>`` (``B·T²·(9C+F)``
  work, ``B·T²`` memory) plus ``plain`` for the sum;
* ``unfold``: the per-example gradients ``P_iᵀ Y_i`` as one batched matrix
  product of the unfolded patches with the cotangent; their sum over examples is
  the summed gradient (nothing computed twice);
* ``offsets``: the same product split by kernel offset, each a batched product of
  a shifted view of the input with the cotangent (no unfolded copy);
* ``vmap``: one transposed convolution per example under ``vmap``.

It is the calibration input of the per-layer cost model in the statistics kernel:
run it on each backend and compare the forms' ratios to ``plain``.

    PYTHONPATH=. python benchmarks/layer_forms.py --batches 128 512 --out results/layer_forms_gpu.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
from common import machine, now
import jax.numpy as jnp
from jax import lax

# (label, spatial size, input channels, output channels): the 3x3 convolutions of the
# CLI's models on 32x32 images, one row per distinct shape (stride 1).
SHAPES = (
    ("SmallCNN conv2", 16, 32, 64),
    ("SmallCNN conv3", 8, 64, 128),
    ("ResNet-20 stage 1", 32, 16, 16),
    ("ResNet-20 stage 2", 16, 32, 32),
    ("ResNet-20 stage 3", 8, 64, 64),
    ("ResNet-18 stage 1", 32, 64, 64),
    ("ResNet-18 stage 2", 16, 128, 128),
    ("ResNet-18 stage 3", 8, 256, 256),
    ("ResNet-18 stage 4", 4, 512, 512),
)
FORMS = ("plain", "gram", "unfold", "offsets", "vmap")
_DN = ("NHWC", "HWIO", "NHWC")
_F32 = dict(preferred_element_type=jnp.float32)


def conv(x, kernel):
  return lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN)


def summed_gradient(x, kernel, y):
  return jax.vjp(lambda k: conv(x, k), kernel)[1](y)[0]


def patches(x):
  """(B, T, 9C) unfolded 3x3 patches (channel-major features, as XLA orders them)."""
  p = lax.conv_general_dilated_patches(x, (3, 3), (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN)
  return p.reshape(p.shape[0], -1, p.shape[-1])


def form_fn(form: str):
  """``(x, kernel, y) -> (summed kernel gradient, per-example squared norms)`` of one form."""

  def flat_y(y):
    return y.reshape(y.shape[0], -1, y.shape[-1])

  if form == "plain":
    return lambda x, k, y: (summed_gradient(x, k, y), jnp.zeros((x.shape[0],), jnp.float32))
  if form == "gram":

    def gram(x, k, y):
      p, yf = patches(x), flat_y(y)
      g_p = jnp.einsum("btp,bsp->bts", p, p, **_F32)
      g_y = jnp.einsum("btf,bsf->bts", yf, yf, **_F32)
      return summed_gradient(x, k, y), jnp.sum(g_p * g_y, axis=(1, 2))

    return gram
  if form == "unfold":

    def unfold(x, k, y):
      per_example = jnp.einsum("btp,btf->bpf", patches(x), flat_y(y), **_F32)
      c = x.shape[-1]
      summed = jnp.sum(per_example, axis=0).reshape(c, 3, 3, -1).transpose(1, 2, 0, 3)
      return summed, jnp.sum(per_example**2, axis=(1, 2))

    return unfold
  if form == "offsets":

    def offsets(x, k, y):
      h, w = y.shape[1:3]
      xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      yf = flat_y(y)
      parts = [
          jnp.einsum("btc,btf->bcf", xp[:, i : i + h, j : j + w].reshape(x.shape[0], -1, x.shape[-1]), yf, **_F32)
          for i in range(3)
          for j in range(3)
      ]
      per_example = jnp.stack(parts, axis=1)  # (B, 9, C, F)
      summed = jnp.sum(per_example, axis=0).reshape(3, 3, x.shape[-1], -1)
      return summed, jnp.sum(per_example**2, axis=(1, 2, 3))

    return offsets
  if form == "vmap":

    def per_example(x, k, y):
      g = jax.vmap(lambda xi, yi: summed_gradient(xi[None], k, yi[None]))(x, y)
      return jnp.sum(g, axis=0), jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)

    return per_example
  raise ValueError(f"form must be one of {FORMS}, got {form!r}.")


def inputs(b: int, size: int, c: int, f: int):
  kx, kk, ky = jax.random.split(jax.random.key(0), 3)
  return (
      jax.random.normal(kx, (b, size, size, c)),
      jax.random.normal(kk, (3, 3, c, f)) / (3 * c**0.5),
      jax.random.normal(ky, (b, size, size, f)),
  )


def time_call(fn, args, reps: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def gram_bytes(b: int, size: int) -> int:
  return 2 * 4 * b * size**4


def run(shapes, batches, reps, max_gib, log) -> list[dict]:
  rows = []
  for label, size, c, f in shapes:
    for b in batches:
      args = inputs(b, size, c, f)
      results = {}
      for form in FORMS:
        row = dict(shape=label, size=size, c=c, f=f, batch=b, form=form, time=None, error="")
        rows.append(row)
        if form == "gram" and gram_bytes(b, size) > max_gib * 2**30:
          row["error"] = "skipped: Gram matrices above --max-gib"
          continue
        fn = jax.jit(form_fn(form))
        row["time"] = time_call(fn, args, reps)
        results[form] = fn(*args)
        log(f"{label:18s} B={b:4d} {form:8s} {fmt_ms(row['time'])} ms")
      summed, norms = results["plain"][0], results["unfold"][1]
      base = rows[-len(FORMS)]["time"]  # plain
      for r in rows[-len(FORMS):]:
        r["ratio"] = r["time"] / base if r["time"] else None
        if r["form"] in results and r["form"] != "plain":
          s_f, n_f = results[r["form"]]
          r["error"] = (
              f"{float(jnp.max(jnp.abs(s_f - summed)) / jnp.max(jnp.abs(summed))):.0e} / "
              f"{float(jnp.max(jnp.abs(n_f - norms) / norms)):.0e}"
          )
  return rows


def fmt_ms(t):
  return "skipped" if t is None else f"{1e3 * t:.3f}"




def to_markdown(rows, command: str, reps: int, elapsed: float) -> str:
  lines = [
      "# Per-example gradient norms of one 3x3 convolution: time of each form",
      "",
      f"- Command: `{command}`",
      f"- Machine: {machine()}",
      f"- Date: {now()}; whole run {elapsed:.0f} s",
      f"- Time: median of {reps} calls after one warm-up, float32, stride 1, padding 1. "
      "`x plain`: time / the summed kernel gradient alone. `err`: max relative error of the summed gradient (against `plain`) / of the norms (against `unfold`).",
      "",
      "| layer | H=W | C→F | batch | form | time (ms) | x plain | err (sum / norms) |",
      "|---|---:|---|---:|---|---:|---:|---|",
  ]
  for r in rows:
    ratio = "n/a" if r.get("ratio") is None else f"{r['ratio']:.2f}"
    lines.append(
        f"| {r['shape']} | {r['size']} | {r['c']}→{r['f']} | {r['batch']} | {r['form']} | "
        f"{fmt_ms(r['time'])} | {ratio} | {r['error']} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", nargs="+", type=int, default=[128])
  parser.add_argument("--reps", type=int, default=None, help="timed calls (default 3 on CPU, 20 otherwise)")
  parser.add_argument("--max-gib", type=float, default=8.0, help="skip Gram forms needing more (GiB)")
  parser.add_argument("--shapes", type=int, default=len(SHAPES), help="only the first N shapes")
  parser.add_argument("--out", type=Path, default=None)
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  reps = args.reps or (3 if backend == "cpu" else 20)
  out = args.out or Path(__file__).parent / "results" / f"layer_forms_{'cpu' if backend == 'cpu' else 'gpu'}.md"
  command = "PYTHONPATH=. python benchmarks/layer_forms.py " + " ".join(sys.argv[1:] if argv is None else argv)
  start = time.perf_counter()
  rows = run(SHAPES[: args.shapes], args.batches, reps, args.max_gib, lambda line: print(line, flush=True))
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(to_markdown(rows, command, reps, time.perf_counter() - start))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
