"""What the statistics step costs on a sharded GPT: collectives, memory per device, the rule's state.

For the CLI's GPT (``divebatch_jax.train.gpt``: token + position tables, pre-LN causal
attention, GELU MLP, head tied to the token table; 2 blocks, 4 heads, T = 64,
vocabulary 256) at width d = 128 and 256, its blocks applied by ``nnx.scan``
(``scan``) or by the same scan fully unrolled (``unrolled``), each block wrapped in
``nnx.remat`` or not, and batches of B = 64 and 256 rows, under

* ``fsdp``: mesh ``data=2,fsdp=4``; rows over both axes, parameters split over
  ``fsdp`` along their ``embed`` axis;
* ``tp``: mesh ``data=2,model=4``; rows over ``data``, parameters split over
  ``model`` along ``heads`` and ``mlp`` (Megatron-style column / row splits),
* ``one``: one device (no collectives; the memory of the statistics step against the
  plain step with the same remat, e.g. on a single GPU),

it compiles the training step of :class:`divebatch_jax.TrainStep` (one fused call,
SGD under DiveBatch, ``method="auto"``) plain and instrumented, and reports from the
compiled programs (nothing is run, so the figures do not depend on the machine's load):

* collective bytes: the result bytes of every all-reduce, all-gather,
  reduce-scatter, all-to-all and collective-permute in the partitioned HLO, times the
  trip count of each enclosing while loop (``known_trip_count``);
* memory per device: ``argument + output + temp - alias`` from ``memory_analysis()``
  of the partitioned program, and the share of the arguments donated (alias /
  argument);
* whether any collective carries a per-example array: a result whose shape is a
  batch dimension (B, or B split over the data axes) followed by a parameter's full
  shape (a kernel or the token table; whole and per layer for the stacked blocks; the position
  table is left out, its (T, d) being an activation's shape too);
* the rule's parameter-shaped state (DiveBatch's ``sum_g``): bytes on one device
  against its whole size.

Run from the repository root on one core, 8 simulated devices (``heavy`` pins a core)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu PYTHONPATH=. \\
      heavy python benchmarks/scale.py --out benchmarks/results/scale_cpu.md
    ... python benchmarks/scale.py --meshes tp --widths 256 --forms scan --remat on --batches 64 --out /tmp/x.md
    PYTHONPATH=. python benchmarks/scale.py --meshes one --widths 256 --out benchmarks/results/scale_gpu.md  # one GPU
"""

from __future__ import annotations

import argparse
import collections
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import machine, now, rerun_command
from flax import nnx

import divebatch_jax as dbj
from divebatch_jax import policies
from divebatch_jax.train import gpt, parallel

MESHES = {"fsdp": "data=2,fsdp=4", "tp": "data=2,model=4", "one": "data=1"}
CONTEXT, VOCAB, DEPTH, HEADS = 64, 256, 2, 4
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2,
               "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%[\w.\-]+ = (.*?) ([\w\-]+)\(")
_SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition|branch_computations|called_computations)=\{?([%\w.\-, ]+)\}?")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  """The HLO module's computations (name -> instruction lines) and the entry's name."""
  comps, entry, current = {}, None, None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(1)
      comps[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None and line.startswith("  "):
      comps[current].append(line)
  return comps, entry


def _multipliers(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
  """How many times each computation runs per call of the entry: a while body (and
  condition) its loop's trip count times its caller's count; any other callee its
  caller's count. Unknown trip counts count once (``-1`` in the result flags them)."""
  runs = collections.Counter({entry: 1})
  unknown = False
  order, seen = [entry], {entry}
  for name in order:  # callers before callees: HLO calls form a DAG
    for line in comps.get(name, []):
      called = [c.strip().lstrip("%") for m in _CALLED.finditer(line) for c in m.group(1).split(",")]
      trips = 1
      if " while(" in line:
        found = _TRIPS.search(line)
        trips = int(found.group(1)) if found else 1
        unknown |= found is None
      for callee in called:
        if callee in comps:
          runs[callee] += runs[name] * (trips if " while(" in line else 1)
          if callee not in seen:
            seen.add(callee)
            order.append(callee)
  if unknown:
    runs["<unknown trip count>"] = -1
  return runs


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _SHAPE.findall(text)]


def collectives(hlo: str) -> list[tuple[str, tuple[int, ...], int, int]]:
  """``(op, shape, bytes, runs)`` of every collective's result arrays in ``hlo``."""
  comps, entry = _computations(hlo)
  runs = _multipliers(comps, entry)
  found = []
  for name, lines in comps.items():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      op = match.group(2)
      base = op[: -len("-start")] if op.endswith("-start") else op
      if base in COLLECTIVES:
        for dtype, shape in _shapes(match.group(1)):
          found.append((base, shape, DTYPE_BYTES[dtype] * math.prod(shape), runs[name]))
  return found


def per_example(found, batch: int, param_shapes: set) -> list[tuple]:
  """The collectives whose result is (a batch dimension, a parameter's full shape)."""
  rows = {batch // k for k in (1, 2, 4, 8)}
  return [c for c in found if len(c[1]) > 1 and c[1][0] in rows and c[1][1:] in param_shapes]


def _param_shapes(params, stacked: bool) -> set:
  shapes = set()
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    key = jax.tree_util.keystr(path)
    if "positions" in key:
      continue
    for shape in (tuple(x.shape), *((tuple(x.shape[1:]),) if "blocks" in key and stacked else ())):
      if len(shape) >= 2:
        shapes.add(shape)
  return shapes


def _setup(mesh_name: str, width: int, form: str, remat: bool, batch: int):
  mesh = parallel.make_axes_mesh(parallel.parse_mesh(MESHES[mesh_name]))
  size = gpt.GPTSize(DEPTH, width, HEADS, CONTEXT, unroll=True if form == "unrolled" else 1, remat=remat)
  graphdef, params = nnx.split(gpt.GPT(size, vocab_size=VOCAB, seed=0), nnx.Param)
  params = parallel.shard(params, parallel.param_shardings(params, mesh))

  def loss_fn(p, b):
    logits = nnx.merge(graphdef, p)(b["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean(-1)

  policy = policies.divebatch(0.01, 4 * batch, resize_every=1)
  tx = dbj.adaptive_batch(optax.sgd(0.1), policy, num_examples=16 * batch, base_batch_size=batch)
  step = dbj.train_step(loss_fn, tx, policy=policy, method="auto", fuse=True)
  tokens = np.random.default_rng(0).integers(0, VOCAB, (batch, CONTEXT + 1)).astype(np.int32)
  rows = parallel.batch_sharding(mesh)
  data = jax.device_put({"x": tokens[:, :-1], "y": tokens[:, 1:]}, rows)
  return step, step.init(params), data, jax.device_put(np.ones(batch, bool), rows)


def measure(mesh_name: str, width: int, form: str, remat: bool, batch: int) -> dict:
  step, state, data, mask = _setup(mesh_name, width, form, remat, batch)
  shapes = _param_shapes(state.params, stacked=form == "scan")
  result = {"mesh": mesh_name, "width": width, "form": form, "remat": remat, "batch": batch}
  for flag, name in ((False, "plain"), (True, "stats")):
    start = time.perf_counter()
    executable = step.executable(state, data, mask, stats=flag)
    compile_s = time.perf_counter() - start
    hlo = executable.as_text()
    found = collectives(hlo)
    memory = executable.memory_analysis()
    peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes - memory.alias_size_in_bytes
    bad = per_example(found, batch, shapes)
    result[name] = {
        "collective_bytes": sum(b * r for _, _, b, r in found),
        "unknown_trips": "known_trip_count" not in hlo and " while(" in hlo,
        "peak": peak, "donated": memory.alias_size_in_bytes / memory.argument_size_in_bytes,
        "per_example": [f"{op} {list(shape)}" for op, shape, _, _ in bad],
        "largest": max(((b, f"{op} {list(s)}") for op, s, b, _ in found), default=(0, "-"))[1],
        "compile_s": compile_s,
    }
  rule = state.opt_state.policy_state.epoch_stats.sum_g
  result["rule_device_bytes"] = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(rule))
  result["rule_bytes"] = sum(x.nbytes for x in jax.tree.leaves(rule))
  result["params_device_bytes"] = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state.params))
  return result


def _mib(n: float) -> str:
  return f"{n / 2**20:.2f}"


def to_markdown(rows: list[dict], command: str, elapsed: float) -> str:
  lines = [
      "# The statistics step on a sharded GPT: collectives and memory per device",
      "",
      f"{now()}; {machine()}; {jax.device_count()} devices. Command (about {elapsed / 60:.0f} min):",
      "",
      f"    {'XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu ' if jax.default_backend() == 'cpu' else ''}{command}",
      "",
      f"GPT: {DEPTH} blocks, {HEADS} heads, T = {CONTEXT}, V = {VOCAB}, tied head; SGD under DiveBatch, "
      "`method='auto'`; one fused TrainStep call, compiled only. fsdp: `data=2,fsdp=4`; tp: `data=2,model=4`; "
      "one: a single device. "
      "Collective MiB: result bytes of every collective times its loops' trip counts. Memory: "
      "argument + output + temp − alias per device. Donated: alias / argument bytes. Per-example: "
      "collectives whose result is (batch rows, a parameter's full shape).",
      "",
      "| mesh | d | blocks | remat | B | coll. MiB plain | coll. MiB stats | ratio | mem MiB plain | mem MiB stats "
      "| ratio | donated plain / stats | per-example collectives (stats) | largest collective (stats) "
      "| sum_g KiB / device (of total) | params KiB / device |",
      "|" + "---|" * 16,
  ]
  for r in rows:
    p, s = r["plain"], r["stats"]
    ratio = lambda a, b: f"{a / b:.2f}x" if b else ("1.00x" if a == b else "inf")
    lines.append(
        f"| {r['mesh']} | {r['width']} | {r['form']} | {'on' if r['remat'] else 'off'} | {r['batch']} "
        f"| {_mib(p['collective_bytes'])} | {_mib(s['collective_bytes'])} | {ratio(s['collective_bytes'], p['collective_bytes'])} "
        f"| {_mib(p['peak'])} | {_mib(s['peak'])} | {ratio(s['peak'], p['peak'])} "
        f"| {p['donated']:.0%} / {s['donated']:.0%} | {', '.join(s['per_example']) or 'none'} | {s['largest']} "
        f"| {r['rule_device_bytes'] / 1024:.0f} ({r['rule_bytes'] / 1024:.0f}) | {r['params_device_bytes'] / 1024:.0f} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--meshes", nargs="+", default=["fsdp", "tp"], choices=list(MESHES))
  parser.add_argument("--widths", nargs="+", type=int, default=[128, 256])
  parser.add_argument("--forms", nargs="+", default=["scan", "unrolled"], choices=["scan", "unrolled"])
  parser.add_argument("--remat", nargs="+", default=["off", "on"], choices=["off", "on"])
  parser.add_argument("--batches", nargs="+", type=int, default=[64, 256])
  parser.add_argument("--out", default="benchmarks/results/scale_cpu.md")
  args = parser.parse_args(argv)
  if set(args.meshes) - {"one"} and jax.device_count() < 8:
    raise SystemExit("--meshes fsdp / tp need 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 on a CPU.")
  start, rows = time.perf_counter(), []
  for mesh_name in args.meshes:
    for width in args.widths:
      for form in args.forms:
        for remat in args.remat:
          for batch in args.batches:
            row = measure(mesh_name, width, form, remat == "on", batch)
            rows.append(row)
            print(to_markdown([row], "", 0).splitlines()[-1], flush=True)
  text = to_markdown(rows, rerun_command("benchmarks/scale.py", argv), time.perf_counter() - start)
  with open(args.out, "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
