"""Protocol L of ``benchmarks/reproduce.py``: batch-size rules on a character language model.

The CPU-sized char GPT (``--model gpt``: 2 blocks, width 64, ≈0.1M parameters) on
tinyshakespeare windows of 32 characters, a fixed token budget (2,000 training
windows = 64,000 tokens per epoch, 3 epochs: 192,000 tokens for every method), AdamW
(lr 3e-3, β = (0.9, 0.99), weight decay 0.1), 20 warmup steps and a cosine over the
run's tokens, gradients clipped to norm 1, b0 = 8, b_max = 64, every rule deciding
every 25 optimizer steps, the learning rate left on its schedule when the batch
changes (``lr_rule="none"``, as Lau et al. run the norm test under Adam); validation
on 512 held-out windows after every epoch, i.e. at equal tokens for every method.

The report gives, per method over its seeds, the validation loss after each epoch
(nats per character, mean ± std), and the optimizer steps and tokens at the first
epoch whose validation loss is at or below a common target (the best method's mean
final loss + :data:`TARGET_MARGIN` nats), and at a fixed looser target
(:data:`LOOSE_TARGET`).
"""

from __future__ import annotations

import statistics

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
TARGET_MARGIN = 0.05  # nats per character above the best mean final validation loss
LOOSE_TARGET = 2.5  # nats per character: a second target that the growing rules reach too


def methods(protocol: dict) -> dict[str, dict]:
  """Every rule compared, as changes to :data:`PROTOCOL` (the linear ramp and Seesaw
  where the CLI has them)."""
  b0, b_max = protocol["batch_size"], protocol["max_batch_size"]
  compared = {
      "constant-b0": dict(method="sgd"),
      "constant-bmax": dict(method="sgd", batch_size=b_max),
      "linear-ramp": dict(method="linear-ramp"),
      # Seesaw follows a per-epoch schedule's halvings: the per-epoch cosine over the same 3
      # epochs (1, 0.75, 0.25 of the peak) in place of the cosine over tokens
      "seesaw": dict(method="seesaw", schedule="cosine"),
      "divebatch": dict(method="divebatch", first_resize=4 * b0),
      "norm-test": dict(method="norm-test", eta=0.5),
      "noise-scale": dict(method="noise-scale", noise_target_scale=1.0),
      "goodput": dict(method="goodput"),
  }
  return {name: change for name, change in compared.items() if change["method"] in cli_methods.NAMES}


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
  lines = [
      f"Command: `{command}` (one cell: add `--methods M --seeds K --force`). Validation loss in "
      f"nats per character (uniform: ln 65 = 4.174), mean ± std over seeds; target "
      f"{target:.3f} = the best mean final loss + {TARGET_MARGIN}, and {LOOSE_TARGET}; steps and tokens "
      "to a target are means over the seeds that reach it (at epoch resolution).",
      "",
      f"| method | seeds | {head} | {target:.3f}: reached / steps / tokens | {LOOSE_TARGET}: reached / steps / tokens "
      "| total steps | train s (incl. compile) | final b (median) |",
      "|---|---:|" + "---:|" * len(tokens) + "---|---|---:|---:|---:|",
  ]
  for method, runs in cells.items():
    per_epoch = [_mean_std([records[e]["test_loss"] for _, records in runs if len(records) > e])
                 for e in range(epochs)]
    reached = [_reached(runs, t) for t in (target, LOOSE_TARGET)]
    lines.append(
        f"| {method} | {len(runs)} | {' | '.join(per_epoch)} | {' | '.join(reached)} | "
        f"{statistics.fmean(records[-1]['total_steps'] for _, records in runs):,.0f} | "
        f"{statistics.fmean(s['train_time_s'] for s, _ in runs):.1f} | "
        f"{statistics.median(records[-1]['next_batch_size'] for _, records in runs):.0f} |"
    )
  return lines
