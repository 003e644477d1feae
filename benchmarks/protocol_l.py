"""Protocol L of ``benchmarks/reproduce.py``: batch-size rules on a character language model.

The CPU-sized char GPT (``--model gpt``: 2 blocks, width 64, ≈0.1M parameters) on
tinyshakespeare windows of 32 characters, a fixed token budget (2,000 training
windows = 64,000 tokens per epoch, 3 epochs: 192,000 tokens for every method), AdamW
(lr 3e-3, β = (0.9, 0.99), weight decay 0.1), 20 warmup steps and a cosine over the
run's tokens, gradients clipped to norm 1, b0 = 8, b_max = 64, every rule deciding
every 25 optimizer steps, the learning rate left on its schedule when the batch
changes (``lr_rule="none"``, as Lau et al. run the norm test under Adam); validation
on 512 held-out windows after every epoch, i.e. at equal tokens for every method.

Every rule runs on the same schedule, the cosine over tokens: Seesaw doubles the
batch at each halving of that cosine (``policies.seesaw_over_examples``, lr × √(b/b0)
under AdamW), and ``cbs-warmup`` follows the critical batch size measured on constant
b0's seed-0 run (:func:`ensure_cbs`: the run kept with a checkpoint per epoch, then
``divebatch-train cbs``; the curve is committed in ``results/reproduce/L_cbs/``).

The report gives, per method over its seeds, the validation loss after each epoch
(nats per character, mean ± std), and the optimizer steps and tokens at the first
epoch whose validation loss is at or below a common target (the best method's mean
final loss + :data:`TARGET_MARGIN` nats), and at a fixed looser target
(:data:`LOOSE_TARGET`).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from divebatch_jax.train import methods as cli_methods

PROTOCOL = dict(
    dataset="tinyshakespeare", model="gpt", context=32, num_examples=2000, num_test_examples=512,
    epochs=3, batch_size=8, max_batch_size=64, optimizer="adamw", lr=3e-3, weight_decay=0.1,
    warmup_steps=20, clip_norm=1.0, schedule="cosine-examples", resize_every_steps=25,
    growth_every=1, test_every=25, device_batch=16, eval_batch_size=512, lr_rule="none",
    # compiling dominates a cell on a loaded CPU (54 executables, 68 s of the first cell):
    # the cells share JAX's persistent cache (numerics unchanged; later cells load instead)
    compilation_cache="/tmp/divebatch_protocol_l_xla",
)
# The GPU preset (benchmarks/gpu_suite.sh, stage lm): the ≈10.8M-parameter char GPT (6 blocks,
# width 384, context 256) on every training window, b0 = 32 -> b_max = 512.
PROTOCOL_GPU = dict(
    PROTOCOL, model="gpt-10m", context=256, num_examples=None, num_test_examples=None, epochs=3,
    batch_size=32, max_batch_size=512, lr=1e-3, warmup_steps=50, resize_every_steps=20,
    test_every=20, device_batch=None, eval_batch_size=256,
)
CBS_DIR = "L_cbs"  # under the cells' root: the constant-b0 run measured for cbs-warmup
CBS_MULTIPLES = (1, 2, 4, 8)  # branches at 8 ... 64 = b_max
CBS_BUDGET = 2048  # examples per branch: one epoch's windows (65,536 tokens), a third of the run
B0_TOLERANCE = 0.01  # nats: "reaches constant b0's final loss" within this
TARGET_MARGIN = 0.05  # nats per character above the best mean final validation loss
LOOSE_TARGET = 2.5  # nats per character: a second target that the growing rules reach too


def methods(protocol: dict, root: Path | None = None) -> dict[str, dict]:
  """Every rule compared, as changes to :data:`PROTOCOL`, all on its cosine over tokens
  (``root``: the cells' root, where cbs-warmup's measured curve lives)."""
  b0, b_max = protocol["batch_size"], protocol["max_batch_size"]
  compared = {
      "constant-b0": dict(method="sgd"),
      "constant-bmax": dict(method="sgd", batch_size=b_max),
      "linear-ramp": dict(method="linear-ramp"),
      "seesaw": dict(method="seesaw"),  # the halvings of the same cosine over tokens
      "cbs-warmup": dict(method="cbs-warmup", cbs_file=str(cbs_file(root or Path("/nonexistent")))),
      "divebatch": dict(method="divebatch", first_resize=4 * b0),
      "norm-test": dict(method="norm-test", eta=0.5),
      "noise-scale": dict(method="noise-scale", noise_target_scale=1.0),
      "goodput": dict(method="goodput"),
  }
  return {name: change for name, change in compared.items() if change["method"] in cli_methods.NAMES}


def _final_batch(summary: dict, records: list[dict]) -> int:
  """The last optimizer step's batch (``last_batch_size``; older cells: the next epoch's)."""
  last = records[-1]
  return last.get("last_batch_size", last["next_batch_size"])


def _mean_std(values: list[float]) -> str:
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def _to_target(records: list[dict], target: float) -> tuple[int, int] | None:
  """(optimizer steps, tokens) through the first epoch with validation loss <= target."""
  for r in records:
    if r["test_loss"] <= target + 1e-12:
      return r["total_steps"], r["total_tokens"]
  return None


def _reached(runs: list[tuple[dict, list[dict]]], target: float) -> str:
  """``k/seeds / mean steps / mean tokens`` to ``target`` over the seeds that reach it."""
  hits = [h for h in (_to_target(records, target) for _, records in runs) if h is not None]
  if not hits:
    return f"0/{len(runs)} / — / —"
  return (f"{len(hits)}/{len(runs)} / {statistics.fmean(h[0] for h in hits):,.0f} / "
          f"{statistics.fmean(h[1] for h in hits):,.0f}")


def table(cells: dict[str, list[tuple[dict, list[dict]]]], command: str) -> list[str]:
  """RESULTS.md lines for protocol L's cells ``{method: [(summary, records), ...]}``."""
  if not cells:
    return ["(no cells of protocol L)"]
  finals = {m: [records[-1]["test_loss"] for _, records in runs] for m, runs in cells.items()}
  target = min(statistics.fmean(v) for v in finals.values()) + TARGET_MARGIN
  epochs = max(len(records) for runs in cells.values() for _, records in runs)
  tokens = [next(records[e]["total_tokens"] for runs in cells.values() for _, records in runs if len(records) > e)
            for e in range(epochs)]
  head = " | ".join(f"val loss @ {t:,} tokens" for t in tokens)
  b0_final = b0_loss(cells)
  b0_head = "—" if b0_final is None else f"{b0_final:.3f}"
  lines = [
      f"Command: `{command}` (one cell: add `--methods M --seeds K --force`). Validation loss in "
      f"nats per character (uniform: ln 65 = 4.174), mean ± std over seeds; targets: constant b0's "
      f"mean final loss ({b0_head}), {target:.3f} = the best mean final loss + {TARGET_MARGIN}, and "
      f"{LOOSE_TARGET}; steps and tokens to a target are means over the seeds that reach it (at epoch "
      "resolution: validation runs after each epoch).",
      "",
      f"| method | seeds | {head} | b0's {b0_head}: reached / steps / tokens | {target:.3f}: reached / steps / tokens "
      f"| {LOOSE_TARGET}: reached / steps / tokens | total steps | train s (incl. compile) | final b (median) |",
      "|---|---:|" + "---:|" * len(tokens) + "---|---|---|---:|---:|---:|",
  ]
  for method, runs in cells.items():
    per_epoch = [_mean_std([records[e]["test_loss"] for _, records in runs if len(records) > e])
                 for e in range(epochs)]
    reached = [_reached(runs, t) if t is not None else "—" for t in (b0_final, target, LOOSE_TARGET)]
    lines.append(
        f"| {method} | {len(runs)} | {' | '.join(per_epoch)} | {' | '.join(reached)} | "
        f"{statistics.fmean(records[-1]['total_steps'] for _, records in runs):,.0f} | "
        f"{statistics.fmean(s['train_time_s'] for s, _ in runs):.1f} | "
        f"{statistics.median(_final_batch(s, records) for s, records in runs):.0f} |"
    )
  lines += ["", *goal_lines(cells)]
  return lines


def cbs_file(root: Path) -> Path:
  """Where cbs-warmup's curve is: ``ROOT/L_cbs/run/cbs.json``."""
  return Path(root) / CBS_DIR / "run" / "cbs.json"


def ensure_cbs(root: Path, config, echo=print) -> Path:
  """Measures the critical batch size for cbs-warmup once: constant b0's config
  (``config``, seed 0) trained with a checkpoint per epoch into ``ROOT/L_cbs/run``, then
  ``cbs.measure`` (branches at :data:`CBS_MULTIPLES` · b0). Returns the cbs.json."""
  import shutil  # pylint: disable=g-import-not-at-top

  from divebatch_jax.train import cbs, loop  # pylint: disable=g-import-not-at-top

  path = cbs_file(root)
  if path.is_file():
    return path
  run = path.parent
  shutil.rmtree(run, ignore_errors=True)
  loop.train_and_evaluate(config.replace(out=str(run), checkpoint_every=1), echo=lambda line: None)
  cbs.measure(run, multiples=CBS_MULTIPLES, budget_examples=CBS_BUDGET, echo=echo)
  for scratch in ("compilation_cache", "checkpoints"):  # the curve, the run's metrics and config are kept
    shutil.rmtree(run / scratch, ignore_errors=True)
  return path


def _final_losses(runs) -> list[float]:
  return [records[-1]["test_loss"] for _, records in runs]


def b0_loss(cells: dict) -> float | None:
  """Constant b0's mean final validation loss (None without its cells)."""
  runs = cells.get("constant-b0")
  return statistics.fmean(_final_losses(runs)) if runs else None


def summary_fields(runs: list, b0_final: float | None) -> dict:
  """Protocol L's summary.json additions (pinned names): ``final_test_loss_mean`` and
  ``final_test_loss_std`` (nats per token, over seeds), ``steps_to_b0_loss_mean`` and
  ``tokens_to_b0_loss_mean`` (optimizer steps / tokens until the validation loss first
  reaches constant b0's final mean, at epoch resolution, over the seeds that reach it;
  None where none does) and ``b0_loss_seeds`` (how many do)."""
  finals = _final_losses(runs)
  hits = [] if b0_final is None else [h for h in (_to_target(r, b0_final) for _, r in runs) if h is not None]
  return {
      "final_test_loss_mean": statistics.fmean(finals),
      "final_test_loss_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
      "steps_to_b0_loss_mean": statistics.fmean(h[0] for h in hits) if hits else None,
      "tokens_to_b0_loss_mean": statistics.fmean(h[1] for h in hits) if hits else None,
      "b0_loss_seeds": len(hits),
  }


def goal_lines(cells: dict) -> list[str]:
  """The goal's verdict: a rule reaching constant b0's final loss (within
  :data:`B0_TOLERANCE`) in >= 2x fewer optimizer steps, all seeds; else the closest."""
  b0_final = b0_loss(cells)
  if b0_final is None:
    return []
  b0_steps = statistics.fmean(records[-1]["total_steps"] for _, records in cells["constant-b0"])
  rows = []
  for method, runs in cells.items():
    if method == "constant-b0":
      continue
    hits = [_to_target(records, b0_final + B0_TOLERANCE) for _, records in runs]
    if all(h is not None for h in hits):
      rows.append((b0_steps / statistics.fmean(h[0] for h in hits), method, statistics.fmean(h[0] for h in hits)))
  lines = [f"Goal (≥ 2× fewer optimizer steps to constant b0's final validation loss {b0_final:.3f} + "
           f"{B0_TOLERANCE} nats, every seed; constant b0: {b0_steps:,.0f} steps):"]
  if not rows:
    return lines + ["no rule reaches it in every seed."]
  ratio, method, steps = max(rows)
  verdict = "met" if ratio >= 2 else "not met"
  return lines + [f"{verdict}: the closest is {method}, {steps:,.0f} steps ({ratio:.2f}× fewer)."]
