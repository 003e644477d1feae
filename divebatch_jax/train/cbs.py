"""The critical batch size of a finished run, measured from its checkpoints.

Merrill et al. (2025, "Critical Batch Size Revisited") measure the critical batch
size (CBS) along a run directly: from a checkpoint, short branches train at
batch sizes k·b for the same budget of tokens, with the run's learning-rate rule;
the CBS is the largest batch whose loss after the budget stays within a tolerance ε
of the small batch's. Here, for each point of a run (its initialisation and each
kept checkpoint, ``OUT/checkpoints``)::

    for k in multiples (1, 2, 4, 8, ...):  B = k · b0, steps = budget // B
        branch: the checkpoint's parameters, B examples a step, the run's lr schedule
                continued from the checkpoint's step and examples (× k or √k under
                --lr-rule linear / sqrt); the same examples in the same order for every k
        loss(B) = the validation loss after the branch
    CBS = the largest B with loss(B') <= (1 + ε) · loss(b0) for every B' <= B

A point where the run's schedule has ended (a cosine at its last checkpoint: rate 0)
is skipped, with a line saying so: no branch would move.

Each branch continues the run's optimizer state (Adam's moments) where the run's
transformation state has the branch's structure (a constant-batch run, the usual
subject); otherwise, and at initialisation, it starts a fresh one, the same for every
k. The first kind is what the paper does; cbs.json says which (``optimizer_state``). ``divebatch-train cbs --out D`` writes
``D/cbs.json`` (:func:`~divebatch_jax.train.cbs_curve.read_curve` reads it back for ``--method cbs-warmup``),
``D/cbs.md`` and ``D/cbs.png`` (CBS against tokens, or examples).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from divebatch_jax import policies
from divebatch_jax.data import SamplerState
from divebatch_jax.train import checkpoints, loop, metrics, resume, safe_files
from divebatch_jax.train.cbs_curve import CBS_JSON, read_curve
from divebatch_jax.train.config import ConfigError, TrainConfig, validate
from divebatch_jax.train.lr_schedule import learning_rate
from divebatch_jax.transform import set_hyperparameter

CBS_MD, CBS_PNG = "cbs.md", "cbs.png"
MULTIPLES = (1, 2, 4, 8)
EPSILON = 0.01  # relative: loss(B) <= (1 + ε) · loss(b0)
BRANCH_SEED_OFFSET = 7919  # the branches' data order: the run's seed + this
_LR_SCALE = {"none": lambda k: 1.0, "linear": float, "sqrt": math.sqrt, "adascale": lambda k: 1.0}


def stored_config(run_dir: str | Path) -> TrainConfig:
  """The run's config.json as a validated TrainConfig (one ConfigError line without one)."""
  if resume.read_stored(run_dir) is None:
    raise ConfigError(f"cbs --out {run_dir}: no config.json there; point --out at a finished divebatch-train run.")
  config = resume.resumed_config(TrainConfig(out=str(run_dir), resume=True), {"out", "resume"})
  return validate(config.replace(resume=False, progress=False, tensorboard=None))


def critical_batch_size(losses: dict[int, float], epsilon: float = EPSILON) -> int:
  """The largest batch B whose loss and every smaller batch's stay within (1 + ε) of the
  smallest batch's loss::

      >>> critical_batch_size({8: 2.00, 16: 2.01, 32: 2.03, 64: 2.02}, epsilon=0.01)
      16
  """
  sizes = sorted(losses)
  limit = (1.0 + epsilon) * losses[sizes[0]]
  cbs = sizes[0]
  for size in sizes[1:]:
    if not losses[size] <= limit + 1e-12:
      break
    cbs = size
  return cbs


def _points(setup, config: TrainConfig, run_dir: Path, run_engine) -> list[tuple]:
  """(epoch, steps, examples, params, optimizer state or None) at initialisation and at
  each kept checkpoint."""
  records = metrics.read_records(run_dir / metrics.METRICS_FILE)
  steps = metrics.cumulative(records, "steps")
  examples = metrics.cumulative(records, "examples")
  points = [(0, 0, 0, setup.params, None)]
  aux = setup.rest if setup.batch_norm else None
  state = run_engine.step.init(setup.params, aux)
  target = {"params": state.params, "opt_state": state.opt_state, "rest": setup.model_state(state)}
  directory = Path(config.out) / resume.CHECKPOINTS_DIR
  for epoch in checkpoints.committed_steps(directory):
    if 0 < epoch <= len(records):
      restored = checkpoints.restore_checkpoint(directory, target, step=epoch)
      points.append((epoch, steps[epoch - 1], examples[epoch - 1], restored.state["params"], restored.state["opt_state"]))
  return points


def _same_structure(a, b) -> bool:
  same = jax.tree.structure(a) == jax.tree.structure(b)
  return same and all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _branch(setup, engine, point, config: TrainConfig, size: int, budget: int, scale: float) -> float:
  """The validation loss after ``budget // size`` steps of ``size`` from ``point``."""
  epoch, steps_before, examples_before, params, opt_state = point
  aux = setup.rest if setup.batch_norm else None
  state = engine.step.init(jax.tree.map(jnp.copy, params), aux)  # the step donates its state
  if opt_state is not None and _same_structure(state.opt_state, opt_state):  # the run's moments carried over
    state = state._replace(opt_state=jax.tree.map(jnp.copy, opt_state))  # the step donates its state
  train, test = loop._pipelines(setup, engine)  # pylint: disable=protected-access
  try:
    train.restore(SamplerState(0, 0))
    for i in range(max(budget // size, 1)):
      rate = scale * learning_rate(config, epoch=epoch, step=steps_before + i,
                                   examples=examples_before + i * size, num_examples=setup.n)
      state = state._replace(opt_state=set_hyperparameter(state.opt_state, "learning_rate", rate))
      state, _ = engine.step.run(state, train.next_batch(size), epoch=epoch)
    _, loss, _ = loop._evaluate(setup.eval_step, state.params, setup.model_state(state), test)  # pylint: disable=protected-access
  finally:
    train.close()
    test.close()
  return loss


def measure(run_dir: str | Path, *, multiples: Sequence[int] = MULTIPLES, budget_examples: int | None = None,
            epsilon: float = EPSILON, echo: Callable[[str], None] = print) -> dict:
  """Measures the CBS at each point of the finished run in ``run_dir`` (module docstring)
  and writes cbs.json, cbs.md and cbs.png there; returns cbs.json's content.

  ``budget_examples``: examples per branch (default: 8 steps of the largest batch).
  """
  run_dir = Path(run_dir)
  multiples = sorted({int(k) for k in multiples})
  if not multiples or multiples[0] < 1:
    raise ConfigError(f"cbs --multiples must be integers >= 1, got {list(multiples)}.")
  if not 0 <= epsilon < 1:
    raise ConfigError(f"cbs --epsilon must be in [0, 1), got {epsilon!r}.")
  config = stored_config(run_dir)
  setup = loop._set_up(config, lambda line: None)  # pylint: disable=protected-access
  b0 = config.batch_size
  sizes = [k * b0 for k in multiples]
  budget = budget_examples or 8 * sizes[-1]
  if budget < sizes[-1]:
    raise ConfigError(f"cbs --budget-examples must be >= the largest batch {sizes[-1]}, got {budget}.")
  with_rates = loop.methods.method(config.method).needs_rates
  run_engine = loop._engine(setup, config.device_batch or b0, policies.constant() if with_rates else None, None)  # pylint: disable=protected-access
  points = _points(setup, config, run_dir, run_engine)
  scale = _LR_SCALE.get(config.lr_rule, lambda k: 1.0)
  branch_config = config.replace(method="sgd", lr_rule="none", lr_batch_coupling=None, seed=config.seed + BRANCH_SEED_OFFSET)
  tokens = setup.data.tokens_per_example or 0
  rows = []
  engines = {}
  for size in sizes:
    cfg = branch_config.replace(batch_size=size, max_batch_size=size)
    branch_setup = dataclasses.replace(setup, config=cfg)
    engines[size] = (branch_setup, loop._engine(branch_setup, size, policies.constant(), None))  # pylint: disable=protected-access
  carried = None
  for point in points:
    if learning_rate(config, epoch=point[0], step=point[1], examples=point[2], num_examples=setup.n) <= 0:
      echo(f"cbs: epoch {point[0]} skipped: the run's learning-rate schedule has ended there (rate 0)")
      continue
    losses = {size: _branch(*engines[size], point, config, size, budget, scale(size // b0)) for size in sizes}
    cbs = critical_batch_size(losses, epsilon)
    if point[4] is not None:
      fresh = engines[sizes[0]][1].step.init(point[3], setup.rest if setup.batch_norm else None)
      carried = _same_structure(fresh.opt_state, point[4])
    rows.append({"epoch": point[0], "steps": point[1], "examples": point[2], "tokens": point[2] * tokens,
                 "losses": {str(s): v for s, v in losses.items()}, "cbs": cbs})
    echo(f"cbs: epoch {point[0]} ({point[2]:,} examples): " + ", ".join(f"b={s}: {v:.4f}" for s, v in losses.items())
         + f" -> CBS {cbs}")
  result = {"run": str(run_dir), "base_batch_size": b0, "multiples": multiples, "budget_examples": budget,
            "epsilon": epsilon, "tokens_per_example": tokens,
            "optimizer_state": "the run's" if carried else "fresh", "points": rows}
  safe_files.write_atomic(run_dir / CBS_JSON, json.dumps(result, indent=1) + "\n")
  safe_files.write_atomic(run_dir / CBS_MD, "\n".join(table(result)) + "\n")
  plot(result, run_dir / CBS_PNG)
  return result


def table(result: dict) -> list[str]:
  """cbs.md's lines: one row per point, the loss per batch and the CBS."""
  sizes = [str(k * result["base_batch_size"]) for k in result["multiples"]]
  unit = "tokens" if result["tokens_per_example"] else "examples"
  lines = [
      f"Critical batch size of `{result['run']}`: branches of {result['budget_examples']:,} examples at each "
      f"batch, ε = {result['epsilon']} (relative to b = {result['base_batch_size']}'s validation loss).",
      "",
      f"| epoch | {unit} | " + " | ".join(f"loss b={s}" for s in sizes) + " | CBS |",
      "|---:|---:|" + "---:|" * len(sizes) + "---:|",
  ]
  for row in result["points"]:
    x = row["tokens"] if result["tokens_per_example"] else row["examples"]
    lines.append(f"| {row['epoch']} | {x:,} | " + " | ".join(f"{row['losses'][s]:.4f}" for s in sizes)
                 + f" | {row['cbs']} |")
  return lines


def plot(result: dict, path: Path) -> None:
  """CBS against tokens (examples for non-text data), log-2 batch axis."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  per = result["tokens_per_example"]
  xs = [row["tokens"] if per else row["examples"] for row in result["points"]]
  figure = Figure(figsize=(6, 4), layout="constrained")
  axes = figure.subplots()
  axes.plot(xs, [row["cbs"] for row in result["points"]], marker="o")
  axes.set(xlabel="tokens" if per else "examples", ylabel="critical batch size", yscale="log",
           title=f"CBS (ε = {result['epsilon']}, budget {result['budget_examples']:,} examples)")
  axes.set_yscale("log", base=2)
  axes.grid(True, alpha=0.3)
  safe_files.write_png(figure, path)
