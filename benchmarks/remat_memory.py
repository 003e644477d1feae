"""Compiled memory of the statistics step against the plain step, for GPTs with rematerialised blocks.

For the GPT of ``tests/tiny_gpt.py`` (2 blocks, T = 128, vocabulary 256, 4 heads, head
tied to the token table) at width d, its blocks stacked and applied by ``nnx.scan`` or
unrolled, every block wrapped in ``nnx.remat`` with a policy of
``jax.checkpoint_policies``, and each batch size B, this compiles (never runs) on the
same batch:

* ``plain``: loss and gradient sums (``stats.micro_batch_sums`` without a method): the
  user's step, with the user's remat;
* ``auto``: the same plus Σ||g_i||² by ``method="auto"`` (what the CLI's instrumented
  step runs; the taps walk the checkpoint bodies and re-wrap them in ``jax.checkpoint``
  with the same policy and ``prevent_cse``);
* ``auto, remat dropped``: ``auto`` with the checkpoints inlined without re-wrapping
  (the taps before re-wrapping: what the statistics step cost with the user's remat lost);
* ``plain, no remat``: the plain step of the same GPT without ``nnx.remat``, for scale;

and reports XLA's ``memory_analysis()`` of each compiled step, ``argument + output +
temp`` (bytes), with the ratio to ``plain``, and ``auto``'s method and fallback share.

Run from the repository root::

    PYTHONPATH=. python benchmarks/remat_memory.py          # results/remat_memory_cpu.md
    PYTHONPATH=. python benchmarks/remat_memory.py --widths 128 --batches 32 --policies nothing --out /tmp/x.md
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from common import machine, now, rerun_command
from flax import nnx

from divebatch_jax import stats
from divebatch_jax.stats import _jax_compat, taps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import tiny_gpt  # noqa: E402

VOCAB, CONTEXT, DEPTH, HEADS = 256, 128, 2, 4
POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
VARIANTS = ("plain", "auto", "auto, remat dropped", "plain, no remat")


def peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes


@contextlib.contextmanager
def remat_dropped():
  """The taps inline every checkpoint without re-wrapping it (the user's remat lost)."""
  options = _jax_compat.checkpoint_options
  _jax_compat.checkpoint_options = lambda eqn: None
  try:
    yield
  finally:
    _jax_compat.checkpoint_options = options


def step(loss_fn, method):
  def run(params, batch, mask):
    sums, _ = stats.micro_batch_sums(loss_fn, params, batch, mask, method=method)
    loss, grad = stats.mean_loss_and_grad(sums, params)
    return loss, grad, sums.count, sums.sum_sq

  return jax.jit(run)


def measure(width: int, scan: bool, policy: str, batch_size: int) -> dict:
  def gpt(remat):
    model = tiny_gpt.TinyGPT(VOCAB, CONTEXT, width, HEADS, DEPTH, scan=scan, rngs=nnx.Rngs(0), remat=remat)
    return tiny_gpt.gpt_loss(model)

  loss_fn, params = gpt(POLICIES[policy])
  batch = tiny_gpt.gpt_batch(batch_size, CONTEXT, VOCAB)
  mask = jnp.ones((batch_size,), bool)
  plan = taps.trace_plan(loss_fn, params, batch)
  row = {"auto_method": stats.preferred_method(loss_fn, params, batch), "fallback": plan.fallback_share()}
  compile_ = lambda fn, p: fn.lower(p, batch, mask).compile()
  row["plain"] = peak_bytes(compile_(step(loss_fn, None), params))
  row["auto"] = peak_bytes(compile_(step(loss_fn, "auto"), params))
  with remat_dropped():
    row["auto, remat dropped"] = peak_bytes(compile_(step(loss_fn, "auto"), params))
  plain_fn, plain_params = gpt(False)
  row["plain, no remat"] = peak_bytes(compile_(step(plain_fn, None), plain_params))
  return row


def to_markdown(rows, command: str, elapsed: float) -> str:
  lines = [
      "# Statistics step against the plain step, GPT blocks under `nnx.remat` (compiled memory)",
      "",
      f"{now()}; {machine()}; {elapsed:.0f} s.",
      "",
      f"Command: `{command}`",
      "",
      f"GPT of `tests/tiny_gpt.py`: {DEPTH} blocks, T = {CONTEXT}, vocabulary {VOCAB}, {HEADS} heads, tied head; "
      "every block in `nnx.remat(policy=...)`. Memory: XLA `memory_analysis()` of the compiled step, "
      "argument + output + temp, MiB (ratio to `plain`, the user's step with the same remat). "
      "`auto`: the statistics step (`micro_batch_sums(method=\"auto\")`); `auto, remat dropped`: the taps "
      "with every checkpoint inlined and not re-wrapped; `plain, no remat`: the same GPT without `nnx.remat`.",
      "",
      "| model | policy | B | auto runs | fallback | " + " | ".join(VARIANTS) + " |",
      "|---|---|---:|---|---:|" + "---:|" * len(VARIANTS),
  ]
  for r in rows:
    cells = [f"{r[v] / 2**20:.1f} ({r[v] / r['plain']:.2f}x)" for v in VARIANTS]
    lines.append(
        f"| d={r['width']} {'nnx.scan' if r['scan'] else 'unrolled'} | {r['policy']} | {r['batch']} | "
        f"{r['auto_method']} | {r['fallback']:.1%} | " + " | ".join(cells) + " |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--widths", type=int, nargs="+", default=[128, 256])
  parser.add_argument("--batches", type=int, nargs="+", default=[32, 64])
  parser.add_argument("--policies", nargs="+", default=["nothing", "dots"], choices=sorted(POLICIES))
  parser.add_argument("--layouts", nargs="+", default=["scan", "unrolled"], choices=["scan", "unrolled"])
  parser.add_argument("--out", default=str(Path(__file__).parent / "results" / f"remat_memory_{jax.default_backend()}.md"))
  args = parser.parse_args(argv)
  start, rows = time.perf_counter(), []
  for width in args.widths:
    for layout in args.layouts:
      for policy in args.policies:
        for b in args.batches:
          row = dict(width=width, scan=layout == "scan", policy=policy, batch=b)
          row.update(measure(width, layout == "scan", policy, b))
          rows.append(row)
          print({k: (f"{v / 2**20:.1f}" if k in VARIANTS else v) for k, v in row.items()}, flush=True)
  text = to_markdown(rows, rerun_command("benchmarks/remat_memory.py", argv), time.perf_counter() - start)
  Path(args.out).write_text(text)
  print(text)


if __name__ == "__main__":
  main()
