"""The comparison this library stands behind: every batch-size rule, several seeds.

Each cell (protocol, method, seed) is one run of the CLI's loop, written to
``ROOT/<protocol>/<method>/seed<k>/`` (``metrics.jsonl``, ``summary.json``); a cell
whose ``summary.json`` exists is skipped, so the script resumes where it stopped
and any cell can be rerun alone (``--force --methods m --seeds k``). ``--report``
aggregates the cells into ``benchmarks/RESULTS.md`` and its plot.

Protocols:

* ``A``: real CIFAR-10 (``../shared/data/tfds``), the CLI's SmallCNN on a 4,000-image
  subset (1,000 test), 8 epochs, b0 = 32, b_max = 512, SGD momentum 0.9, lr 0.05
  cosine, decisions every 2 epochs: every method × 3 seeds in about 90 minutes on
  one core of this project's CPU machines (``taskset -c 0``: the committed cells ran on one
  core, and XLA:CPU on two threads rounds the convolutions' sums differently, which SGD
  amplifies into another trajectory).
* ``B``: synthetic logistic regression (the DiveBatch authors' prototype), 20 epochs:
  checks the rules' mechanics in minutes.
* ``L``: a character GPT on tinyshakespeare at a fixed token budget, AdamW, every rule
  deciding every 25 steps (:mod:`protocol_l`): 3 seeds × 8 rules, each cell about a minute
  on one core (``taskset -c 1``); reported as validation loss at equal tokens and steps /
  tokens to a common target loss.
* ``C``: ResNet-20 (GroupNorm) on the full CIFAR-10, GPU only (``--dataset`` an npz
  from ``cifar10_jpeg_bundle.py``), as many epochs as the time allows.

``--quick`` runs protocol B for every method and protocol A for three methods on a
1,000-image subset, one seed: under 10 minutes on 2 CPU cores.

    PYTHONPATH=. python benchmarks/reproduce.py --protocol B
    taskset -c 0 env PYTHONPATH=. python benchmarks/reproduce.py --protocol A   # resumable
    PYTHONPATH=. python benchmarks/reproduce.py --report                # RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

from divebatch_jax.train import loop, metrics
from divebatch_jax.train.config import TrainConfig

import protocol_l

ROOT = Path(__file__).resolve().parent / "results" / "reproduce"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

PROTOCOLS = {
    "L": protocol_l.PROTOCOL,
    "LG": protocol_l.PROTOCOL_GPU,
    "A": dict(
        dataset="cifar10", model="cnn", num_examples=4000, num_test_examples=1000, epochs=8,
        batch_size=32, max_batch_size=512, lr=0.05, schedule="cosine", resize_every=2,
        growth_every=2, test_every=10, eval_batch_size=500, device_batch=32,
    ),
    "B": dict(
        dataset="synthetic", model="logreg", num_examples=4000, num_test_examples=2000, epochs=20,
        batch_size=16, max_batch_size=1024, lr=0.5, schedule="constant", momentum=0.0,
        weight_decay=0.0, resize_every=4, growth_every=4, test_every=10, device_batch=256,
    ),
    "C": dict(
        dataset="cifar10", model="resnet20", epochs=30, batch_size=128, max_batch_size=2048,
        lr=0.1, schedule="cosine", resize_every=5, growth_every=5, test_every=20,
    ),
    # "Trained to convergence", CPU-sized: a small subset trained until SGD-small's test
    # accuracy plateaus, cosine lr; every growing rule with and without the lr-batch coupling.
    "D": dict(
        dataset="cifar10", model="cnn", num_examples=1000, num_test_examples=500, epochs=15,
        batch_size=16, max_batch_size=256, lr=0.05, schedule="cosine", resize_every=3,
        growth_every=3, test_every=10, eval_batch_size=500, device_batch=32,
    ),
}
# Protocol D: the rules compared with and without --lr-batch-coupling replace. Goodput is left
# out: it chooses among throughputs measured on the machine, so its cells would not be
# reproducible from their command alone.
COUPLED_RULES = {
    "adabatch": dict(method="adabatch"),
    "sebs": dict(method="sebs", growth_factor=2.0),
    "divebatch": dict(method="divebatch"),
    "linear-ramp": dict(method="linear-ramp"),
    "norm-test": dict(method="norm-test", eta=0.5),
    "noise-scale": dict(method="noise-scale", noise_target_scale=1.0),
    "inner-product": dict(method="inner-product", theta=0.5, nu=1.0),
}
QUICK = {"A": dict(num_examples=1000, num_test_examples=500, epochs=4, resize_every=1, growth_every=1)}


def coupled_methods() -> dict[str, dict]:
  """Protocol D's configurations: SGD-small, each rule plain and coupled, Seesaw both ways, and
  DiveBatch on the micro-batch estimator beside the exact one."""
  compared = {"sgd-small": dict(method="sgd")}
  for name, changes in COUPLED_RULES.items():
    compared[name] = dict(changes, lr_batch_coupling="none")
    compared[f"{name}-coupled"] = dict(changes, lr_batch_coupling="replace")
  compared["seesaw"] = dict(method="seesaw", lr_batch_coupling="replace")
  compared["seesaw-uncoupled"] = dict(method="seesaw", lr_batch_coupling="none")
  compared["divebatch-microbatch"] = dict(method="divebatch", stats_method="microbatch", lr_batch_coupling="none")
  compared["divebatch-microbatch-coupled"] = dict(method="divebatch", stats_method="microbatch", lr_batch_coupling="replace")
  return compared


def methods(name: str, protocol: dict, root: Path | None = None) -> dict[str, dict]:
  """Every configuration compared, as changes to the protocol's config (protocol D's from
  :func:`coupled_methods`, protocol L's from :func:`protocol_l.methods`).

  DiveBatch's δ: the paper's 0.1; ``suggest`` = suggest_delta(4·b0, n, Δ̂ = 2), the
  docs' rule for a first resize to about 4·b0; ``first`` lets the policy set δ at
  its first resize so that it asks for exactly 4·b0.
  """
  if name == "D":
    return coupled_methods()
  if protocol.get("dataset") == protocol_l.PROTOCOL["dataset"]:
    return protocol_l.methods(protocol, root)
  b0, b_max, n = protocol["batch_size"], protocol["max_batch_size"], protocol["num_examples"]
  suggest = 4 * b0 / (n * 2.0)
  ratio = b_max / b0
  return {
      "sgd-small": dict(method="sgd"),
      "sgd-large": dict(method="sgd", batch_size=b_max),
      "sgd-large-linear": dict(method="sgd", batch_size=b_max, lr=protocol["lr"] * ratio),
      "adabatch": dict(method="adabatch"),
      "adabatch-0.75": dict(method="adabatch", lr_factor=0.75),
      "sebs": dict(method="sebs", growth_factor=2.0),
      "divebatch-paper": dict(method="divebatch", delta=0.1),
      "divebatch-suggest": dict(method="divebatch", delta=suggest),
      "divebatch-ema": dict(method="divebatch", delta=suggest, estimator="ema"),
      "divebatch-first": dict(method="divebatch", first_resize=4 * b0),
      "divebatch-decrease": dict(method="divebatch", delta=suggest, allow_decrease=True),
      "divebatch-linear": dict(method="divebatch", delta=suggest, lr_rule="linear", lr_ramp_steps=0),
      "divebatch-linear-ramp": dict(method="divebatch", delta=suggest, lr_rule="linear", lr_ramp_steps=50),
      "norm-test": dict(method="norm-test", eta=0.5),
      "inner-product": dict(method="inner-product", theta=0.5, nu=1.0),
      "noise-scale": dict(method="noise-scale", noise_target_scale=1.0),
      "goodput": dict(method="goodput"),
  }


def cell_config(protocol_name: str, method: str, seed: int, quick: bool, root: Path, data: dict) -> TrainConfig:
  protocol = dict(PROTOCOLS[protocol_name], **(QUICK.get(protocol_name, {}) if quick else {}), **data)
  if protocol.get("num_examples") is None and protocol_name != "LG":  # LG: every window
    protocol["num_examples"] = 50_000
  changes = methods(protocol_name, protocol, root)[method]
  out = root / protocol_name / method / f"seed{seed}"
  return TrainConfig(**{**protocol, **changes, "seed": seed, "out": str(out), "progress": False,
                        "checkpoint_every": 10_000})


def cell_command(protocol: str, method: str, seed: int) -> str:
  """The command that reruns one cell exactly (one core, as the committed cells ran)."""
  return (f"taskset -c 1 env PYTHONPATH=. python benchmarks/reproduce.py --protocol {protocol} "
          f"--methods {method} --seeds {seed} --force")


def run_cell(config: TrainConfig, force: bool, command: str) -> str:
  out = Path(config.out)
  if (out / metrics.SUMMARY_FILE).is_file() and not force:
    return "done before"
  shutil.rmtree(out, ignore_errors=True)
  start = time.perf_counter()
  loop.train_and_evaluate(config, echo=lambda line: None)
  for scratch in ("checkpoints", "compilation_cache"):  # only the metrics are kept
    shutil.rmtree(out / scratch, ignore_errors=True)
  (out / "command.txt").write_text(command + "\n")
  return f"ran in {time.perf_counter() - start:.0f} s"


# --------------------------------------------------------------------------- report


def _mean_std(values: list[float]) -> str:
  if not values:
    return "n/a"
  mean = statistics.fmean(values)
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _first_reaching(records: list[dict], target: float) -> dict | None:
  """Epoch, steps, examples and train seconds through the first epoch at >= target."""
  steps = examples = seconds = 0
  for r in records:
    steps, examples, seconds = steps + r["steps"], examples + r["examples"], seconds + r["train_time_s"]
    if r["test_accuracy"] >= target - 1e-9:
      return {"epoch": r["epoch"], "steps": steps, "examples": examples, "seconds": seconds}
  return None


def _cells(root: Path, protocol: str) -> dict[str, list[tuple[dict, list[dict]]]]:
  found = {}
  for method_dir in sorted((root / protocol).glob("*")):
    runs = []
    for seed_dir in sorted(method_dir.glob("seed*")):
      if (seed_dir / metrics.SUMMARY_FILE).is_file():
        summary = json.loads((seed_dir / metrics.SUMMARY_FILE).read_text())
        runs.append((summary, metrics.read_records(seed_dir / metrics.METRICS_FILE)))
    if runs:
      found[method_dir.name] = runs
  return found


def _avg(values):
  values = [v for v in values if v is not None]
  return statistics.fmean(values) if values else None


def _fmt(value, spec=",.0f"):
  return "—" if value is None else format(value, spec)


def table(protocol: str, root: Path) -> tuple[list[str], dict]:
  cells = _cells(root, protocol)
  if not cells:
    return [f"(no cells of protocol {protocol} under {root})"], {}
  finals = {m: [s["final_accuracy"] for s, _ in runs] for m, runs in cells.items()}
  best = max(statistics.fmean(v) for v in finals.values())
  target = 0.9 * best
  lines = [
      f"Common target: {100 * target:.2f}% (90% of the best method's mean final accuracy, "
      f"{100 * best:.2f}%). Means over seeds; `—`: not reached by any seed. A diverged run (loss NaN) "
      "stops at that epoch: its final accuracy is its last finite epoch's and it has no within-1-point "
      "figures.",
      "",
      "| method | seeds | diverged | final acc (mean ± std) | within 1 pt of own final: epoch / steps / examples / train s "
      "| target: reached / epoch / steps / examples / train s | total steps | total train s | final b (median) |",
      "|---|---:|---:|---:|---|---|---:|---:|---:|",
  ]
  stats = {}
  for method, runs in cells.items():
    within = [(s["first_within_epoch"], s["first_within_steps"], s["first_within_examples"],
               s["first_within_train_time_s"]) for s, _ in runs]
    reached = [_first_reaching(records, target) for _, records in runs]
    hits = [r for r in reached if r is not None]
    stats[method] = {
        "final": statistics.fmean(finals[method]),
        "final_se": (statistics.stdev(finals[method]) / math.sqrt(len(runs))) if len(runs) > 1 else 0.0,
        "steps_within": _avg([w[1] for w in within]),
    }
    diverged = [s["diverged_at_epoch"] for s, _ in runs if s.get("diverged_at_epoch") is not None]
    lines.append(
        f"| {method} | {len(runs)} | {len(diverged)}{f' (epoch {min(diverged)})' if diverged else ''} | "
        f"{_mean_std(finals[method])} | "
        f"{_fmt(_avg([w[0] for w in within]), '.1f')} / {_fmt(_avg([w[1] for w in within]))} / "
        f"{_fmt(_avg([w[2] for w in within]))} / {_fmt(_avg([w[3] for w in within]), '.1f')} | "
        f"{len(hits)}/{len(runs)} / {_fmt(_avg([h['epoch'] for h in hits]), '.1f')} / "
        f"{_fmt(_avg([h['steps'] for h in hits]))} / {_fmt(_avg([h['examples'] for h in hits]))} / "
        f"{_fmt(_avg([h['seconds'] for h in hits]), '.1f')} | "
        f"{_fmt(_avg([s['steps'] for s, _ in runs]))} | {_fmt(_avg([s['train_time_s'] for s, _ in runs]), '.1f')} | "
        f"{statistics.median(s['final_batch_size'] for s, _ in runs):.0f} |"
    )
  return lines, stats


def coupling_table(root: Path) -> list[str]:
  """Protocol D: each rule without and with the coupling beside SGD-small (summary.json's figures)."""
  rows = protocol_summary("D", root)
  sgd = rows.get("sgd-small")
  if sgd is None:
    return []

  def cell(name):
    r = rows.get(name)
    if r is None:
      return "not run | | |"
    fewer = sgd["total_steps_mean"] / r["total_steps_mean"]
    return (f"{r['final_accuracy_mean']:.2f} ± {r['final_accuracy_std']:.2f} ({r['seeds']}) | "
            f"{r['final_accuracy_mean'] - sgd['final_accuracy_mean']:+.2f} | {r['total_steps_mean']:,.0f} ({fewer:.1f}× fewer) |")

  lines = [
      f"SGD-small: {sgd['final_accuracy_mean']:.2f} ± {sgd['final_accuracy_std']:.2f}% ({sgd['seeds']} seeds) in "
      f"{sgd['total_steps_mean']:,.0f} steps. Per rule: final accuracy mean ± std (seeds), its difference to "
      "SGD-small in points, total optimizer steps.",
      "",
      "| rule | plain: final acc | Δ pt | steps | coupled (`replace`): final acc | Δ pt | steps |",
      "|---|---:|---:|---:|---:|---:|---:|",
  ]
  pairs = [(rule, rule, f"{rule}-coupled") for rule in COUPLED_RULES]
  pairs += [("seesaw", "seesaw-uncoupled", "seesaw"), ("divebatch, micro-batch estimator", "divebatch-microbatch", "divebatch-microbatch-coupled")]
  for label, plain, coupled in pairs:
    lines.append(f"| {label} | {cell(plain)} {cell(coupled)}")
  return lines


def trajectories(protocol: str, root: Path) -> list[str]:
  """Batch size and statistic per epoch of each method's seed 0."""
  lines = ["| method | batch size per epoch (seed 0) | statistic at decisions (seed 0) |", "|---|---|---|"]
  for method, runs in _cells(root, protocol).items():
    records = runs[0][1]
    sizes = " ".join(str(r["batch_size"]) for r in records) + f" → {records[-1]['next_batch_size']}"
    stat = " ".join("—" if r.get("statistic") is None else f"{r['statistic']:.3g}" for r in records)
    lines.append(f"| {method} | {sizes} | {stat} |")
  return lines


def plot(protocol: str, root: Path, path: Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  cells = _cells(root, protocol)
  figure, (by_steps, sizes) = plt.subplots(1, 2, figsize=(13, 4.5))
  for method, runs in cells.items():
    records = runs[0][1]
    steps = metrics.cumulative(records, "steps")
    accuracy = [statistics.fmean(r[i]["test_accuracy"] for _, r in runs) for i in range(len(records))]
    by_steps.plot(steps, accuracy, marker=".", label=method)
    sizes.plot([r["epoch"] for r in records], [r["batch_size"] for r in records], marker=".", label=method)
  by_steps.set(xscale="log", xlabel="optimizer steps (seed 0's count)", ylabel="test accuracy (mean over seeds)",
               title=f"protocol {protocol}")
  sizes.set(yscale="log", xlabel="epoch", ylabel="batch size (seed 0)")
  sizes.legend(fontsize=7, ncol=2)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="B")
  parser.add_argument("--methods", nargs="+", default=None, help="default: every method")
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--quick", action="store_true", help="protocol B and a small A, one seed (< 10 min)")
  parser.add_argument("--force", action="store_true", help="rerun cells that are done")
  parser.add_argument("--root", type=Path, default=ROOT)
  parser.add_argument("--dataset", default=None, help="protocol C: e.g. npz:/tmp/cifar10.npz")
  parser.add_argument("--report", action="store_true", help="write RESULTS.md's generated tables from the cells")
  args = parser.parse_args(argv)
  if args.report:
    write_report(args.root)
    return
  data = {"dataset": args.dataset} if args.dataset else {}
  if args.quick:
    plan = [("B", m, 0) for m in methods("B", PROTOCOLS["B"])]
    plan += [("A", m, 0) for m in ("sgd-small", "adabatch", "divebatch-first")]
    root = args.root.parent / "reproduce_quick" if args.root == ROOT else args.root
  else:
    protocol = dict(PROTOCOLS[args.protocol], **data)
    protocol.setdefault("num_examples", 50_000)
    chosen = args.methods or list(methods(args.protocol, protocol, args.root))
    plan = [(args.protocol, m, s) for s in args.seeds for m in chosen]
    root = args.root
  for protocol_name, method, seed in plan:
    config = cell_config(protocol_name, method, seed, args.quick, root, data)
    if method == "cbs-warmup" and protocol_name.startswith("L"):  # its curve: constant b0's, measured once
      base = cell_config(protocol_name, "constant-b0", 0, args.quick, root, data)
      protocol_l.ensure_cbs(root, base.replace(progress=False))
    command = cell_command(protocol_name, method, seed)
    print(f"{protocol_name} {method:22s} seed {seed}: {run_cell(config, args.force, command)}", flush=True)


def protocol_summary(protocol: str, root: Path) -> dict[str, dict]:
  """``{method: {seeds, final_accuracy_mean (%), final_accuracy_std, total_steps_mean,
  total_examples_mean, train_seconds_mean}}`` over the protocol's cells (the pinned shape);
  protocol L's entries add :func:`protocol_l.summary_fields` (``final_test_loss_mean``,
  ``final_test_loss_std``, ``steps_to_b0_loss_mean``, ...)."""
  summary = {}
  cells = _cells(root, protocol)
  b0_final = protocol_l.b0_loss(cells) if protocol.startswith("L") else None
  for method, runs in cells.items():
    finals = [100 * s["final_accuracy"] for s, _ in runs]
    summary[method] = {
        "seeds": len(runs),
        "final_accuracy_mean": statistics.fmean(finals),
        "final_accuracy_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
        "total_steps_mean": statistics.fmean(s.get("total_steps", s["steps"]) for s, _ in runs),
        "total_examples_mean": statistics.fmean(s.get("total_examples", s["examples"]) for s, _ in runs),
        "train_seconds_mean": statistics.fmean(s["train_time_s"] for s, _ in runs),
    }
    if protocol.startswith("L"):  # a language model: the losses (nats per token) and b0's loss reached
      summary[method].update(protocol_l.summary_fields(runs, b0_final))
  return summary


def write_summary(root: Path, path: Path) -> None:
  """``path`` (summary.json) for every protocol with cells, written atomically."""
  found = {p: protocol_summary(p, root) for p in PROTOCOLS if _cells(root, p)}
  temporary = path.with_name(f".{path.name}.tmp")
  temporary.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
  temporary.replace(path)
  print(f"wrote {path}")


BESIDE_PAPER = (  # (label, protocol, cells per column: SGD small, SGD large, AdaBatch, DiveBatch)
    ("ours, protocol A (4,000 images, 8 epochs, b0 32, b_max 512)", "A",
     ("sgd-small", "sgd-large", "adabatch", "divebatch-first")),
    ("ours, protocol A, the paper's δ = 0.1", "A", (None, None, None, "divebatch-paper")),
    ("ours, protocol D (1,000 images, 15 epochs, b0 16, b_max 256)", "D",
     ("sgd-small", None, "adabatch", "divebatch")),
    ("ours, protocol D with `--lr-batch-coupling replace`", "D",
     (None, None, "adabatch-coupled", "divebatch-coupled")),
)


PAPER_ROWS = (  # the DiveBatch authors' table (ALGORITHMS.md §1), final accuracy % / first epoch within 1 point
    "| paper, CIFAR-10 (b0 128, b_max 2048) | 95.50 / ep 168 | 92.47 / ep 103 | 94.88 / ep 82 | 93.82 / ep 98 |",
    "| paper, CIFAR-100 | 74.92 / ep 129 | 67.59 / ep 62 | 72.99 / ep 63 | 71.75 / ep 61 |",
    "| paper, Tiny-ImageNet | 55.49 / ep 41 | 31.08 / ep 48 | 53.72 / ep 32 | 51.66 / ep 31 |",
)


def _gap(found: dict, rule: str, reference: str = "sgd-small") -> str:
  if rule not in found or reference not in found:
    return "not run"
  return f"{found[reference]['final_accuracy_mean'] - found[rule]['final_accuracy_mean']:.2f}"


def beside_paper(root: Path) -> list[str]:
  """The paper's table with our rows under it, from the cells' summary (final accuracy
  mean ± std / total optimizer steps (seeds); ``not run`` where a cell is missing), and
  the gaps to SGD-small in points."""
  rows = ["| | SGD small batch | SGD large batch (b_max) | AdaBatch | DiveBatch |", "|---|---|---|---|---|", *PAPER_ROWS]
  for label, protocol, names in BESIDE_PAPER:
    found = protocol_summary(protocol, root)
    cells = []
    for name in names:
      r = found.get(name) if name else None
      cells.append("—" if name is None else "not run" if r is None else
                   f"{r['final_accuracy_mean']:.2f} ± {r['final_accuracy_std']:.2f} / {r['total_steps_mean']:,.0f} ({r['seeds']} seeds)")
    rows.append(f"| {label} | " + " | ".join(cells) + " |")
  a, d = protocol_summary("A", root), protocol_summary("D", root)
  rows += ["", f"Gaps to SGD-small in points (paper, CIFAR-10: AdaBatch 0.62, DiveBatch 1.68): protocol A "
           f"AdaBatch {_gap(a, 'adabatch')}, DiveBatch {_gap(a, 'divebatch-first')}; protocol D AdaBatch "
           f"{_gap(d, 'adabatch')}, DiveBatch {_gap(d, 'divebatch')} without the coupling, "
           f"{_gap(d, 'adabatch-coupled')} and {_gap(d, 'divebatch-coupled')} with it."]
  return rows


def _replace_between(text: str, start: str, end: str, lines: list[str]) -> str:
  head, rest = text.split(start, 1)
  _, tail = rest.split(end, 1)
  return head + start + "\n" + "\n".join(lines) + "\n" + end + tail


def write_report(root: Path) -> None:
  """Rewrites the generated part of RESULTS.md (between its markers) and ``summary.json``
  from the cells."""
  write_summary(root, root / "summary.json")
  start, end = "<!-- generated by benchmarks/reproduce.py --report: start -->", "<!-- generated: end -->"
  parts = []
  for protocol in ("A", "B", "C", "D", "L", "LG"):
    if not _cells(root, protocol):
      continue
    if protocol.startswith("L"):
      command = f"taskset -c 1 env PYTHONPATH=. python benchmarks/reproduce.py --protocol {protocol}"
      curve = root / protocol_l.CBS_DIR / "run" / "cbs.md"
      shown = curve.read_text().replace(f"{RESULTS.parent}/", "benchmarks/") if curve.is_file() else ""
      measured = ["Critical batch size measured for cbs-warmup:", "", *shown.splitlines(), ""] if (
          protocol == "L" and curve.is_file()) else []
      parts += [f"### Protocol {protocol}", "", *protocol_l.table(_cells(root, protocol), command), "",
                *trajectories(protocol, root), "", *measured]
      continue
    lines, _ = table(protocol, root)
    plot(protocol, root, RESULTS.parent / "results" / f"reproduce_{protocol}.png")
    paired = [*coupling_table(root), ""] if protocol == "D" else []
    parts += [f"### Protocol {protocol}", "", *paired, *lines, "", *trajectories(protocol, root), "",
              f"![protocol {protocol}](results/reproduce_{protocol}.png)", ""]
  text = RESULTS.read_text() if RESULTS.is_file() else f"{start}\n{end}\n"
  text = _replace_between(text, start, end, parts)
  paper = ("<!-- generated by benchmarks/reproduce.py --report: ours beside the paper -->", "<!-- generated: ours end -->")
  if paper[0] in text:
    text = _replace_between(text, *paper, beside_paper(root))
  RESULTS.write_text(text)
  print(f"wrote {RESULTS}")


if __name__ == "__main__":
  main(sys.argv[1:])
