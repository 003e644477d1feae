"""The training loop behind ``divebatch-train``: testable, driven by a TrainConfig.

One epoch::

    needs = policy.needs_stats(epoch)             # host, static
    for each step:  b = current batch size (read at decision points only)
                    batch = pipeline.next_batch(b)    # padded to a bucket + mask
                    params, opt_state = step(...)     # stats step or plain step
    evaluate; write one metrics.jsonl record; checkpoint every k epochs

Both steps are jitted once per bucket shape ``(K, m)``. The statistics step runs
:func:`divebatch_jax.stats.microbatch.accumulate_gradients` with the configured
method and hands the record to the optimizer (``tx.update(..., stats=stats)``);
the plain step differentiates the masked loss sum and, for BatchNorm models,
threads the running averages.

Resuming: checkpoints are written at epoch ends (params, optimizer state,
running averages, and the host state: epoch, sampler position, metrics so far).
A run killed anywhere restarts from the last committed checkpoint and repeats the
lost epochs exactly (same seed: same order, same augmentation, same steps), so
its metrics equal the uninterrupted run's except for the timings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from divebatch_jax.train import parallel
from divebatch_jax import stats as stats_lib
from divebatch_jax.stats import accumulate_gradients
from divebatch_jax.train.compilations import CompileCounter
from divebatch_jax.data import CropFlip, Pipeline, SamplerState, bucket_ladder
from divebatch_jax.train import checkpoints, metrics, models
from divebatch_jax.train.config import STATISTIC_METHODS, TrainConfig, validate
from divebatch_jax.train.datasets import load_dataset
from divebatch_jax.train.optim import epoch_learning_rate, make_optimizer, make_policy, with_learning_rate
from divebatch_jax.transform import batch_state_summary, current_batch_size

# Decisions of these policies fall on steps, not epoch ends: the loop re-reads the
# batch size every ``test_every`` steps.
STEP_LEVEL_METHODS = ("norm-test", "inner-product", "noise-scale")


def _plain_step(graphdef, tx, params, opt_state, rest, batch, mask):
  """Σ over micro-batches of the masked loss sum and its gradient, running averages threaded.

  The K micro-batches are unrolled in Python, not scanned: XLA:CPU runs
  convolution gradients inside a loop body 10x+ slower than unrolled ones.
  """
  loss_sum, grad_sum, count = jnp.zeros((), jnp.float32), None, jnp.zeros((), jnp.int32)
  for k in range(mask.shape[0]):
    mb, mb_mask = jax.tree.map(lambda x: x[k], batch), mask[k]

    def summed(p, rest=rest, mb=mb, mb_mask=mb_mask):
      losses, new_rest = models.per_example_losses(graphdef, p, rest, mb, train=True, mask=mb_mask)
      return jnp.sum(jnp.where(mb_mask, losses, 0.0)), new_rest

    (loss, rest), grad = jax.value_and_grad(summed, has_aux=True)(params)
    grad_sum = grad if grad_sum is None else jax.tree.map(jnp.add, grad_sum, grad)
    loss_sum, count = loss_sum + loss, count + jnp.sum(mb_mask, dtype=jnp.int32)
  n = jnp.maximum(count, 1).astype(jnp.float32)
  grads = jax.tree.map(lambda g: g / n, grad_sum)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, rest, loss_sum / n


def _stats_step(graphdef, tx, stats_method, params, opt_state, rest, epoch_stats, batch, mask):
  loss_fn = models.per_example_loss_fn(graphdef, rest)
  loss, grads, stats = accumulate_gradients(loss_fn, params, batch, mask, stats_method=stats_method)
  updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
  epoch_stats = stats_lib.combine_stats(epoch_stats, stats)
  return optax.apply_updates(params, updates), opt_state, epoch_stats, loss


def _evaluate(graphdef, params, rest, pipeline: Pipeline, eval_batch: int):
  """(accuracy, mean loss) over every example of ``pipeline``'s source, in order."""
  correct, loss_sum, total = 0, 0.0, 0
  pipeline.restore(SamplerState(0, 0))
  step = _eval_step(graphdef)
  while True:
    batch = pipeline.next_batch(eval_batch)
    c, l = step(params, rest, batch.data, batch.mask)
    correct, loss_sum, total = correct + int(c), loss_sum + float(l), total + batch.num_real
    if batch.end_of_epoch:
      return correct / total, loss_sum / total


@functools.lru_cache(maxsize=8)
def _eval_step(graphdef):
  @jax.jit
  def eval_step(params, rest, data, mask):
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), data)
    flat_mask = mask.reshape(-1)
    logits, _ = models.forward(graphdef, params, rest, flat["x"], train=False)
    losses = models.cross_entropy(logits, flat["y"])
    hits = (jnp.argmax(logits, -1) == flat["y"]) & flat_mask
    return jnp.sum(hits, dtype=jnp.int32), jnp.sum(jnp.where(flat_mask, losses, 0.0))

  return eval_step


@dataclasses.dataclass
class Run:
  """Everything a run holds between epochs (device state and host position)."""

  params: Any
  opt_state: Any
  rest: Any
  epoch: int
  sampler: SamplerState

  def device_state(self) -> dict:
    return {"params": self.params, "opt_state": self.opt_state, "rest": self.rest}


def _progress(config: TrainConfig):
  enabled = sys.stderr.isatty() if config.progress is None else config.progress
  if not enabled:
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm


def train_and_evaluate(config: TrainConfig, *, echo: Callable[[str], None] = print) -> dict:
  """Trains per ``config``, writes ``metrics.jsonl``, ``summary.json`` and checkpoints.

  Returns the summary dict (also written to ``<out>/summary.json``).
  """
  config = validate(config)
  out = Path(config.out)
  if jax.process_index() > 0:  # every process logs; the others into their own folder
    out = out / f"process_{jax.process_index()}"
  out.mkdir(parents=True, exist_ok=True)
  compiles = CompileCounter().start()
  try:
    return _train(config, out, compiles, echo)
  finally:
    compiles.stop()


def _train(config: TrainConfig, out: Path, compiles: CompileCounter, echo) -> dict:
  data = load_dataset(config)
  n = data.train.num_examples
  model = models.create_model(
      config.model, input_shape=data.input_shape, num_classes=data.num_classes,
      seed=config.seed, norm=config.norm,
  )
  graphdef, params, rest = models.split_model(model)
  tx = make_optimizer(config, n)
  policy = make_policy(config)
  mesh = parallel.make_mesh(config.devices)
  devices = mesh.size
  sharding = parallel.batch_sharding(mesh)
  max_device_batch = config.max_device_batch or config.max_batch_size
  ladder = bucket_ladder(
      min(config.batch_size, max_device_batch), max_device_batch, multiple_of=devices
  )
  augment = CropFlip() if data.augment else None
  train_pipeline = Pipeline(
      data.train, ladder=ladder, seed=config.seed, augment=augment, device=sharding
  )
  eval_batch = min(config.eval_batch_size, data.test.num_examples)
  eval_pipeline = Pipeline(
      data.test, ladder=bucket_ladder(eval_batch, eval_batch, multiple_of=devices),
      shuffle=False, prefetch=0, device=sharding,
  )
  plain_step = jax.jit(functools.partial(_plain_step, graphdef, tx), donate_argnums=(0, 1))
  stats_method = config.stats_method
  stats_step = jax.jit(
      functools.partial(_stats_step, graphdef, tx, stats_method), donate_argnums=(0, 1)
  )

  params, opt_state, rest = parallel.replicate((params, tx.init(params), rest), mesh)
  run = Run(params, opt_state, rest, 0, SamplerState(0, 0))
  ckpt_dir = out / "checkpoints"
  metrics_path = out / metrics.METRICS_FILE
  checkpointing = jax.process_count() == 1
  if not checkpointing:
    echo("checkpoints are off with several JAX processes (see docs/sharp_edges.md); --resume is refused")
    if config.resume:
      raise ValueError("--resume is not supported with several JAX processes.")
  if config.resume:
    restored = checkpoints.restore_checkpoint(ckpt_dir, run.device_state())
    if restored is not None:
      state, host = parallel.replicate(restored.state, mesh), restored.host
      run = Run(state["params"], state["opt_state"], state["rest"], host["epoch"], SamplerState(*host["sampler"]))
      echo(f"resumed from {ckpt_dir} at epoch {run.epoch}")
    else:
      echo(f"--resume: no committed checkpoint in {ckpt_dir}; starting from scratch")
  elif metrics_path.exists() or ckpt_dir.exists():
    raise FileExistsError(
        f"--out {out} already holds a run (metrics.jsonl or checkpoints/): pass --resume to "
        "continue it, or choose another --out."
    )
  (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
  log = metrics.MetricsWriter(metrics_path)

  progress = _progress(config)
  train_pipeline.restore(run.sampler)
  echo(
      f"{config.method} | {config.model} on {data.name} (n={n}, test={data.test.num_examples}) | "
      f"b0={config.batch_size} b_max={config.max_batch_size} buckets={list(ladder.sizes)} | "
      f"devices={devices} processes={jax.process_count()} | "
      f"stats={'per-epoch policy' if config.method in STATISTIC_METHODS else 'none'} ({stats_method})"
  )
  compiles_before = 0  # start-up compilations count towards this process's first epoch
  try:
    while run.epoch < config.epochs:
      epoch = run.epoch
      lr = epoch_learning_rate(config, epoch)
      run.opt_state = with_learning_rate(run.opt_state, lr)
      needs_stats = policy.needs_stats(epoch)
      epoch_stats = stats_lib.empty_stats(run.params)
      batch_size = current_batch_size(run.opt_state)
      start_summary = batch_state_summary(run.opt_state)
      loss_sum = jnp.zeros((), jnp.float32)
      steps = rows = 0
      bar = progress(total=n, desc=f"epoch {epoch}", leave=False, unit="ex") if progress else None
      t0 = time.perf_counter()
      while True:
        batch = train_pipeline.next_batch(batch_size)
        if needs_stats:
          run.params, run.opt_state, epoch_stats, loss = stats_step(
              run.params, run.opt_state, run.rest, epoch_stats, batch.data, batch.mask
          )
        else:
          run.params, run.opt_state, run.rest, loss = plain_step(
              run.params, run.opt_state, run.rest, batch.data, batch.mask
          )
        loss_sum = loss_sum + loss * batch.num_real
        steps += 1
        rows += batch.mask.size
        if bar is not None:
          bar.update(batch.num_real)
        if batch.end_of_epoch:
          break
        if config.method in STEP_LEVEL_METHODS and steps % config.test_every == 0:
          batch_size = current_batch_size(run.opt_state)
      train_loss = float(loss_sum) / n
      train_time = time.perf_counter() - t0
      if bar is not None:
        bar.close()
      t1 = time.perf_counter()
      accuracy, test_loss = _evaluate(graphdef, run.params, run.rest, eval_pipeline, eval_batch)
      eval_time = time.perf_counter() - t1
      end_summary = batch_state_summary(run.opt_state)
      diversity = float(stats_lib.diversity(epoch_stats)) if needs_stats else None
      record = {
          "epoch": epoch + 1,
          "batch_size": start_summary["batch_size"],
          "next_batch_size": end_summary["batch_size"],
          "lr": lr * start_summary["lr_scale"],
          "diversity": _finite_or_none(diversity),
          "requested_batch_size": _requested(config, n, diversity),
          "statistic": _finite_or_none(end_summary["statistic"]) if needs_stats else None,
          "train_loss": train_loss,
          "test_loss": test_loss,
          "test_accuracy": accuracy,
          "train_time_s": train_time,
          "eval_time_s": eval_time,
          "steps": steps,
          "examples": n,
          "compilations": compiles.count - compiles_before,
          "total_steps": end_summary["step"],
          "total_examples": end_summary["examples_seen"],
          "padding_fraction": 1.0 - n / rows,
          "devices": devices,
          "processes": jax.process_count(),
      }
      compiles_before = compiles.count
      if not log.write(record):  # a resumed run repeats epochs the file already holds
        record = log.records[epoch]
      echo(_format_record(record))
      run.epoch += 1
      run.sampler = train_pipeline.state
      if checkpointing and (run.epoch % config.checkpoint_every == 0 or run.epoch == config.epochs):
        checkpoints.save_checkpoint(
            ckpt_dir, run.epoch, run.device_state(),
            {"epoch": run.epoch, "sampler": list(run.sampler)},
        )
  finally:
    train_pipeline.close()
    eval_pipeline.close()
    log.close()
  summary = metrics.write_summary(out)
  return dict(summary, method=config.method, model=config.model, dataset=data.name, out=str(out))


def _finite_or_none(value):
  return None if value is None or not math.isfinite(value) else float(value)


def _requested(config: TrainConfig, n: int, diversity: float | None):
  """δ·n·Δ̂, the batch DiveBatch asks for at a resize (before the clamps)."""
  if config.method != "divebatch" or diversity is None or not math.isfinite(diversity):
    return None
  return config.delta * n * diversity


def _format_record(r: dict) -> str:
  div = "-" if r["diversity"] is None else f"{r['diversity']:.4g}"
  req = "" if r["requested_batch_size"] is None else f" (δ·n·Δ̂={r['requested_batch_size']:.0f})"
  return (
      f"epoch {r['epoch']:3d} | b {r['batch_size']:5d} -> {r['next_batch_size']:5d}{req} | "
      f"lr {r['lr']:.4g} | Δ̂ {div} | loss {r['train_loss']:.4f} | acc {100 * r['test_accuracy']:.2f}% | "
      f"train {r['train_time_s']:.1f}s eval {r['eval_time_s']:.1f}s | steps {r['total_steps']} | "
      f"examples {r['total_examples']} | compiles {r['compilations']} | pad {100 * r['padding_fraction']:.1f}%"
  )
