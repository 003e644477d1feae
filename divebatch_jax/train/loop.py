"""The training loop behind ``divebatch-train``: testable, driven by a TrainConfig.

One run::

    m      = the device batch (measured fastest, or --device-batch)
    policy = build_policy(config, throughput)    # built once, asked for its cadence
    ladder = bucket_ladder(min(b0, m), m)        # one executable per size; a step of
                                                 # b > m rows is ⌈b/m⌉ calls of size m
    tx     = adaptive_batch(..., batch_sizes=ladder.batch_sizes(b_max))   # no padding
    step   = TrainStep(loss, tx, method, policy) # plain / instrumented, BatchNorm aux
    every layout the run can reach is compiled ahead, in a background thread,
    while the first epoch runs; OUT/compilation_cache keeps them for a resumed run
    per epoch:  b = current_batch_size(opt_state, epoch=e)
                for each step: one call (K = 1) or K accumulate calls + apply
                evaluate; one metrics.jsonl record; checkpoint every k epochs

Nothing here restates a policy: its window decides which epochs are instrumented
(``policy.needs_stats``), its ``decision_steps`` when the batch size is re-read,
and Δ̂, the statistic and the requested batch size are read from the
transformation's state.

Resuming: checkpoints are written at epoch ends (params, optimizer state,
BatchNorm's running averages, and the host state: epoch, sampler position, the
device batch). A run killed anywhere restarts from the last committed checkpoint
and repeats the lost epochs exactly (same seed: same order, same augmentation,
same steps), so its metrics equal the uninterrupted run's except for the timings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from divebatch_jax.data import CropFlip, Pipeline, SamplerState, bucket_ladder
from divebatch_jax.data.buckets import round_up
from divebatch_jax.train import checkpoints, device_batch, methods, metrics, models, parallel, resume, run_lock, stopping
from divebatch_jax.train.compilations import CompileCounter
from divebatch_jax.train.config import TrainConfig, cadence_note, user_errors, validate, validate_against_data
from divebatch_jax.train.datasets import load_dataset
from divebatch_jax.train.optim import epoch_learning_rate, make_optimizer
from divebatch_jax.transform import TrainState, TrainStep, batch_state_summary, current_batch_size, set_hyperparameter
from divebatch_jax.transform.policies import BatchSizePolicy


@functools.lru_cache(maxsize=8)
def _eval_step(graphdef):
  @functools.partial(jax.jit, donate_argnums=2)
  def eval_step(params, rest, totals, data, mask):
    hits, loss_sum = models.eval_sums(graphdef, params, rest, data, mask)
    return totals[0] + hits, totals[1] + loss_sum

  return eval_step


def _evaluate(graphdef, params, rest, pipeline: Pipeline) -> tuple[float, float]:
  """(accuracy, mean loss) over every example of ``pipeline``'s source, in order; one
  device-to-host read at the end."""
  pipeline.restore(SamplerState(0, 0))
  step = _eval_step(graphdef)
  totals, total = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)), 0
  while True:
    batch = pipeline.next_batch(min(pipeline.ladder.max_size, pipeline.num_examples))
    for data, mask in batch.micro_batches:
      totals = step(params, rest, totals, data, mask)
    total += batch.num_real
    if batch.end_of_epoch:
      hits, loss_sum = jax.device_get(totals)
      return int(hits) / total, float(loss_sum) / total


@dataclasses.dataclass
class Run:
  """Everything a run holds between epochs (device state and host position)."""

  state: TrainState
  rest: Any
  epoch: int
  sampler: SamplerState

  def device_state(self) -> dict:
    return {"params": self.state.params, "opt_state": self.state.opt_state, "rest": self.rest}


def _progress(config: TrainConfig):
  enabled = sys.stderr.isatty() if config.progress is None else config.progress
  if not enabled:
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm


COMPILATION_CACHE_DIR = "compilation_cache"  # under --out, unless --compilation-cache says otherwise
CACHE_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                  "jax_persistent_cache_min_entry_size_bytes")


def compilation_cache_dir(config: TrainConfig) -> Path | None:
  """Where a run keeps its compiled executables: ``--compilation-cache DIR``, else
  ``OUT/compilation_cache`` (so a resumed run reloads them), None for ``off``."""
  if config.compilation_cache == "off":
    return None
  return Path(config.compilation_cache) if config.compilation_cache else Path(config.out) / COMPILATION_CACHE_DIR


@contextlib.contextmanager
def _compilation_cache(directory: Path | None) -> Iterator[None]:
  """JAX's persistent compilation cache in ``directory`` for the ``with`` block, every
  compile kept; the previous settings come back after (None: left as they are)."""
  if directory is None:
    yield
    return
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top

  previous = {name: getattr(jax.config, name) for name in CACHE_SETTINGS}
  directory.mkdir(parents=True, exist_ok=True)
  for name, value in zip(CACHE_SETTINGS, (str(directory.resolve()), 0.0, 0)):
    jax.config.update(name, value)
  compilation_cache.reset_cache()  # jax opens its cache once: point it at this directory
  try:
    yield
  finally:
    for name, value in previous.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


def train_and_evaluate(
    config: TrainConfig,
    *,
    echo: Callable[[str], None] = print,
    policy: BatchSizePolicy | None = None,
    measurer: device_batch.Measurer | None = None,
) -> dict:
  """Trains per ``config``, writes ``metrics.jsonl``, ``summary.json`` and checkpoints.

  ``policy`` replaces the one ``config.method`` names (e.g. your own rule, or
  ``policies.by_epoch`` replaying another run's batch sizes); ``config.method``
  then only labels the run. ``measurer`` measures and keeps the device batch
  (default :meth:`device_batch.Measurer.from_environment`). The run holds
  ``<out>/.lock`` throughout (:class:`run_lock.RunLocked` when another run does). A
  SIGTERM or SIGINT (main thread) ends the step, writes a checkpoint and raises
  :class:`stopping.Interrupted`; ``--resume`` continues from inside the epoch. Returns the summary dict (also written to
  ``<out>/summary.json``).
  """
  config = validate(config)
  out = Path(config.out)
  if jax.process_index() > 0:  # every process logs; the others into their own folder
    out = out / f"process_{jax.process_index()}"
  with run_lock.hold(out, echo=echo), _compilation_cache(compilation_cache_dir(config)), stopping.on_signals() as stop:
    compiles = CompileCounter().start()
    try:
      return _train(config, out, compiles, echo, policy, measurer, stop)
    finally:
      compiles.stop()


def _shapes(sharding, source, rows: int) -> tuple[dict, jax.ShapeDtypeStruct]:
  """Abstract ``(data, mask)`` of one micro-batch of ``rows`` rows (for compiling ahead)."""
  spec = source.element_spec
  data = {
      "x": jax.ShapeDtypeStruct((rows, *spec["x"].shape), jnp.float32, sharding=sharding),
      "y": jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=sharding),
  }
  return data, jax.ShapeDtypeStruct((rows,), jnp.bool_, sharding=sharding)


class _Precompiler:
  """Compiles the run's executables ahead of need; the first error is kept (the step
  then compiles on demand).

  In a background thread while training runs where the host has cores to spare
  for it (GPU/TPU hosts), synchronously before the first epoch on the CPU backend,
  where compiling and training share the same few cores and the background
  thread fell behind the first resize (a 30-epoch digits run stalled 2-3 s at
  each new size); either way nothing compiles on the critical path after the
  first epoch.
  """

  def __init__(self, work: Callable[[], int], *, background: bool):
    self.count, self.error, self.seconds = 0, None, 0.0
    self.background = background
    self._thread = threading.Thread(target=self._run, args=(work,), name="divebatch-precompile", daemon=True)
    self._thread.start()
    if not background:
      self.join()

  def _run(self, work):
    start = time.perf_counter()
    try:
      self.count = work()
    except Exception as err:  # the step compiles on demand instead  # noqa: BLE001
      self.error = err
    self.seconds = time.perf_counter() - start

  def join(self) -> None:
    self._thread.join()


def _train(config: TrainConfig, out: Path, compiles: CompileCounter, echo, policy, measurer, stop) -> dict:
  with user_errors(f"--dataset {config.dataset}"):
    data = load_dataset(config)
  n = data.train.num_examples
  for note in data.notes:
    echo(note)
  requested = config  # config.json records the flags as given; the clamps follow from the data
  config, notes = validate_against_data(config, n)
  for note in notes:
    echo(note)
  with user_errors(f"--model {config.model} on {data.name}"):
    model = models.create_model(
        config.model, input_shape=data.input_shape, num_classes=data.num_classes,
        seed=config.seed, norm=config.norm,
    )
  graphdef, params, rest = models.split_model(model)
  batch_norm = models.uses_batch_norm(model)
  mesh = parallel.make_mesh(config.devices)
  devices = mesh.size
  sharding = parallel.batch_sharding(mesh)
  method = "microbatch" if batch_norm else config.stats_method
  if batch_norm:
    loss_fn, aux = models.aux_loss_fn(graphdef), rest
  else:
    loss_fn, aux = models.per_example_loss_fn(graphdef, rest), None

  ckpt_dir = Path(config.out) / resume.CHECKPOINTS_DIR  # one folder, shared by every process
  metrics_path = out / metrics.METRICS_FILE
  stored_host = None
  if config.resume:
    with user_errors("--resume"):
      stored_host = _latest_host_state(ckpt_dir)
  elif resume.run_exists(out):
    raise FileExistsError(
        f"--out {out} already holds a run (metrics.jsonl or checkpoints/): pass --resume to "
        "continue it, or choose another --out."
    )

  def build(m: int):
    ladder = bucket_ladder(min(config.batch_size, m), m, multiple_of=devices)
    sizes = ladder.batch_sizes(min(config.max_batch_size, n)) if config.round_batch else None
    tx = make_optimizer(config, n, policy, sizes)
    step = TrainStep(loss_fn, tx, method=method, policy=policy, has_aux=batch_norm)
    return ladder, tx, step

  limit = min(config.max_device_batch or config.max_batch_size, n)
  entry = methods.method(config.method)
  chosen = device_batch.for_run(
      measurer or device_batch.Measurer.from_environment(),
      lambda: device_batch.plain_step_runner(loss_fn, *parallel.replicate((params, aux), mesh), data.train, sharding),
      model=(config.model, config.norm, list(data.input_shape)), batch_size=config.batch_size,
      limit=limit, multiple_of=devices, pinned=config.device_batch,
      restored=stored_host.get("device_batch") if stored_host is not None else None,
      needs_rates=policy is None and entry.needs_rates, echo=echo,
  )
  rates, m = chosen.rates, chosen.size
  if jax.process_count() > 1:  # every process runs process 0's measurement
    rates, m = _agree(rates, m)
  echo(f"device batch m = {m}")
  if policy is None:  # goodput chooses among the layouts measured, up to m
    with user_errors(f"--method {config.method}"):
      policy = methods.build_policy(config, {s: r for s, r in (rates or {}).items() if s <= m})
  setup_start = time.perf_counter()  # the device-batch measurement is not training time
  ladder, tx, step = build(m)
  state = parallel.replicate(step.init(params, aux), mesh)
  run = Run(state, rest, 0, SamplerState(0, 0))
  partial = None  # a mid-epoch checkpoint's EpochProgress
  if stored_host is not None:
    with user_errors("--resume"):
      restored = checkpoints.restore_checkpoint(ckpt_dir, run.device_state())
    if restored is not None:
      for line in restored.skipped:
        echo(line)
      device, host = parallel.replicate(restored.state, mesh), restored.host
      aux_state = device["rest"] if batch_norm else None
      run = Run(TrainState(device["params"], device["opt_state"], aux_state), device["rest"],
                host["epoch"], SamplerState(*host["sampler"]))
      partial = EpochProgress(**host["partial"]) if host.get("partial") else None
      inside = f", step {partial.steps} of epoch {run.epoch + 1}" if partial else ""
      echo(f"resumed from {ckpt_dir} at epoch {run.epoch}{inside}")
  elif config.resume:
    echo(f"--resume: no committed checkpoint in {ckpt_dir}; starting from scratch")
  resume.write_config(out, requested)
  with user_errors(f"--resume: {metrics_path}"):
    log = metrics.MetricsWriter(metrics_path)
  board = _board(config)

  augment = CropFlip() if data.augment else None
  train_pipeline = Pipeline(data.train, ladder=ladder, seed=config.seed, augment=augment, device=sharding)
  eval_rows = round_up(min(config.eval_batch_size, data.test.num_examples), devices)
  eval_pipeline = Pipeline(
      data.test, ladder=bucket_ladder(eval_rows, eval_rows, multiple_of=devices),
      shuffle=False, prefetch=0, device=sharding,
  )
  instrumented_epochs = [e for e in range(config.epochs) if policy.needs_stats(e)]
  if (note := cadence_note(config, policy.needs_stats)) is not None:
    echo(note)
  flags = (False, True) if instrumented_epochs else (False,)
  if policy.needs_stats(0) and len(instrumented_epochs) == config.epochs:
    flags = (True,)
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), run.state
  )
  now = ladder.shape_for(current_batch_size(run.state.opt_state))[1]
  reachable = ladder.sizes if policy.max_batch_size is not None else (now,)  # constant: b0 only
  soonest_first = sorted(reachable, key=lambda s: (s < now, abs(s - now)))

  fused = single_call()
  accumulates = min(config.max_batch_size, n) > m

  def compile_ahead() -> int:
    train_pipeline.precompile(soonest_first)
    eval_pipeline.precompile(eval_pipeline.ladder.sizes)
    shapes = [_shapes(sharding, data.train, s) for s in soonest_first]
    if fused:
      single, micro = shapes, ([_shapes(sharding, data.train, m)] if accumulates else [])
    else:
      single, micro = [], shapes
    return step.precompile(abstract_state, single=single, micro=micro, instrumented=flags)

  precompiler = _Precompiler(compile_ahead, background=jax.default_backend() != "cpu")

  progress = _progress(config)
  train_pipeline.restore(run.sampler)
  echo(
      f"{config.method} | {config.model} on {data.name} (n={n}, test={data.test.num_examples}) | "
      f"b0={config.batch_size} b_max={config.max_batch_size} device batch m={m} "
      f"layouts={list(ladder.sizes)} then x{m} | devices={devices} processes={jax.process_count()} | "
      f"statistics: {method if instrumented_epochs else 'none'}"
      + (" (BatchNorm: micro-batch statistics)" if batch_norm and instrumented_epochs else "")
  )
  compiles_before, stalls_before, diverged_at = 0, 0.0, None
  setup_time = time.perf_counter() - setup_start  # charged to the first epoch's training time
  compile_ahead_s = 0.0 if precompiler.background else precompiler.seconds  # part of setup_time
  try:
    while run.epoch < config.epochs:
      epoch = run.epoch
      lr = epoch_learning_rate(config, epoch)
      if partial is None:
        run.state = run.state._replace(opt_state=set_hyperparameter(run.state.opt_state, "learning_rate", lr))
        partial = EpochProgress(current_batch_size(run.state.opt_state, epoch=epoch),
                                batch_state_summary(run.state.opt_state), 0, 0, 0.0, 0.0)
      instrumented = policy.needs_stats(epoch)
      batch_size, start_summary, steps, rows = partial.batch_size, partial.start_summary, partial.steps, partial.rows
      loss_sum = jnp.asarray(partial.loss_sum, jnp.float32)
      bar = progress(total=n, desc=f"epoch {epoch}", leave=False, unit="ex") if progress else None
      t0 = time.perf_counter() - partial.seconds
      partial = None
      while True:
        batch = train_pipeline.next_batch(batch_size)
        run.state, result = engine_step(step, run.state, batch, instrumented, fused)
        loss_sum = loss_sum + result.loss * result.count
        steps += 1
        rows += batch.shape[0] * batch.shape[1]
        if bar is not None:
          bar.update(batch.num_real)
        if batch.end_of_epoch:
          break
        if policy.decision_steps and steps % policy.decision_steps == 0:
          batch_size = current_batch_size(run.state.opt_state)
        if stop.signum is not None:  # the step is done: keep it, then stop
          run.rest, run.sampler = (run.state.aux if batch_norm else run.rest), train_pipeline.state
          progress_so_far = EpochProgress(batch_size, start_summary, steps, rows, float(loss_sum), time.perf_counter() - t0)
          _save(ckpt_dir, run, m, progress_so_far)
          raise stopping.Interrupted(stop.signum, _stopped_line(stop.signum, config, epoch, steps))
      train_loss = float(loss_sum) / n
      train_time = time.perf_counter() - t0 + setup_time
      compile_s = compile_ahead_s + _stalls(step, train_pipeline) - stalls_before
      setup_time = compile_ahead_s = 0.0
      if bar is not None:
        bar.close()
      eval_rest = run.state.aux if batch_norm else run.rest
      t1 = time.perf_counter()
      accuracy, test_loss = _evaluate(graphdef, run.state.params, eval_rest, eval_pipeline)
      eval_time = time.perf_counter() - t1
      end_summary = batch_state_summary(run.state.opt_state)
      decided = end_summary["decisions"] > start_summary["decisions"]
      statistic = _finite_or_none(end_summary["statistic"]) if instrumented and decided else None
      record = {
          "epoch": epoch + 1,
          "batch_size": start_summary["batch_size"],
          "next_batch_size": end_summary["batch_size"],
          "lr": start_summary["learning_rate"] if start_summary["learning_rate"] is not None else lr,
          "diversity": statistic if entry.statistic == methods.DIVERSITY else None,
          "requested_batch_size": _finite_or_none(end_summary["requested"]) if decided else None,
          "statistic": statistic,
          "train_loss": train_loss,
          "test_loss": test_loss,
          "test_accuracy": accuracy,
          "train_time_s": train_time,
          "eval_time_s": eval_time,
          "steps": steps,
          "examples": n,
          "compilations": compiles.count - compiles_before,
          "compile_s": compile_s,
          "compile_stall_s": _stalls(step, train_pipeline) - stalls_before,
          "total_steps": end_summary["step"],
          "total_examples": end_summary["examples_seen"],
          "padding_fraction": 1.0 - n / rows,
          "device_batch": m,
          "devices": devices,
          "processes": jax.process_count(),
      }
      compiles_before, stalls_before = compiles.count, _stalls(step, train_pipeline)
      message = metrics.check_finite(record)
      if message is not None:  # stop before a non-finite state is logged or saved
        echo(message)
        diverged_at = epoch + 1
        break
      if not log.write(record):  # a resumed run repeats epochs the file already holds
        record = log.records[epoch]
      elif board is not None:
        board.write(log.records[-1])  # as metrics.jsonl holds it
      echo(_format_record(record))
      run.epoch += 1
      run.rest = run.state.aux if batch_norm else run.rest
      run.sampler = train_pipeline.state
      if run.epoch % config.checkpoint_every == 0 or run.epoch == config.epochs or stop.signum is not None:
        _save(ckpt_dir, run, m)
      if stop.signum is not None and run.epoch < config.epochs:
        raise stopping.Interrupted(stop.signum, _stopped_line(stop.signum, config, run.epoch, None))
  finally:
    precompiler.join()
    train_pipeline.close()
    eval_pipeline.close()
    log.close()
    if board is not None:
      board.close()
  if precompiler.error is not None:
    echo(f"note: compiling ahead failed ({precompiler.error}); the steps compiled on demand")
  summary = metrics.write_summary(out, diverged_at_epoch=diverged_at)
  return dict(summary, method=config.method, model=config.model, dataset=data.name, out=str(out))


class EpochProgress(NamedTuple):
  """How far an epoch got: what a mid-epoch checkpoint keeps to continue it exactly (the
  batch size in use, the transformation's summary at the epoch's start, steps and padded
  rows so far, the float32 loss sum, training seconds)."""

  batch_size: int
  start_summary: dict
  steps: int
  rows: int
  loss_sum: float
  seconds: float


def _save(ckpt_dir: Path, run: Run, m: int, partial: EpochProgress | None = None) -> None:
  """Checkpoint ``run.epoch`` (completed epochs), with the partial epoch's progress if any."""
  host = {"epoch": run.epoch, "sampler": list(run.sampler), "device_batch": m}
  if partial is not None:
    host["partial"] = json.loads(json.dumps(partial._asdict(), default=float))  # numpy scalars as floats
  checkpoints.save_checkpoint(ckpt_dir, run.epoch, run.device_state(), host)


def _stopped_line(signum: int, config: TrainConfig, epoch: int, steps: int | None) -> str:
  where = f"after step {steps} of epoch {epoch + 1}" if steps is not None else f"after epoch {epoch}"
  return (f"stopped by {stopping.describe(signum)} {where}; checkpoint written: continue with "
          f"divebatch-train --out {config.out} --resume")


def _board(config: TrainConfig):
  """``--tensorboard DIR``'s writer for this run, ``DIR/<name of --out>`` (process 0 only)."""
  if config.tensorboard is None or jax.process_index() > 0:
    return None
  from divebatch_jax.train.tensorboard import EpochBoard  # pylint: disable=g-import-not-at-top

  return EpochBoard(config.tensorboard, Path(config.out).resolve().name)


def _agree(rates: dict[int, float] | None, m: int) -> tuple[dict[int, float] | None, int]:
  """Process 0's measured rates and device batch, on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  sizes = sorted(rates) if rates else []
  values = np.asarray([m] + [rates[s] for s in sizes], np.float64)
  values = np.asarray(multihost_utils.broadcast_one_to_all(values))
  return (dict(zip(sizes, values[1:].tolist())) if rates else None), int(values[0])


def _stalls(step: TrainStep, pipeline: Pipeline) -> float:
  """Seconds the training thread spent compiling or waiting for a compile."""
  return step.executables.stall_seconds + pipeline.executables.stall_seconds


def _latest_host_state(directory: Path) -> dict | None:
  """The host state of the newest intact checkpoint (None without one)."""
  step, _ = checkpoints.intact_step(directory)
  if step is None:
    return None
  return json.loads((checkpoints.checkpoint_path(directory, step) / checkpoints.HOST_FILE).read_text())


def single_call() -> bool:
  """Whether a step of one micro-batch runs as one fused call (gradient and update).

  On GPUs and TPUs: there a small step takes less device time than three host
  calls take to dispatch (on an H100 the engine's SmallCNN step at b = 128 ran at
  37k examples/s as zero + accumulate + apply, against 240k/s as one call;
  benchmarks/results/GPU_RUNS.md). On the CPU a step of one micro-batch also runs
  as accumulate + apply: the gradient executables then hold no optimizer and the
  update is one executable for every layout, which halves what a run compiles
  (a 30-epoch DiveBatch digits run: 7 s of compiles against 20 s), while the
  extra calls cost little next to the CPU's step.
  """
  return jax.default_backend() != "cpu"


def engine_step(step: TrainStep, state: TrainState, batch, instrumented: bool, single_call: bool = False):
  """One optimizer update on ``batch``: one fused call for a single micro-batch when
  ``single_call``, else one call per micro-batch and the update."""
  if single_call and len(batch.micro_batches) == 1:
    data, mask = batch.micro_batches[0]
    return step(state, data, mask, stats=instrumented)
  sums = None
  for data, mask in batch.micro_batches:
    sums, aux = step.accumulate(state, data, mask, sums, stats=instrumented)
    state = state._replace(aux=aux)
  sum_ip = None
  if instrumented and step.policy.needs_inner_products:
    sum_ip = sum(step.inner_products(state, sums, data, mask) for data, mask in batch.micro_batches)
  return step.apply(state, sums, sum_ip=sum_ip, stats=instrumented)


def _finite_or_none(value):
  return None if value is None or not math.isfinite(value) else float(value)


def _format_record(r: dict) -> str:
  stat = "-" if r["statistic"] is None else f"{r['statistic']:.4g}"
  req = "" if r["requested_batch_size"] is None else f" (asked {r['requested_batch_size']:.0f})"
  name = "Δ̂" if r["diversity"] is not None else "stat"
  return (
      f"epoch {r['epoch']:3d} | b {r['batch_size']:5d} -> {r['next_batch_size']:5d}{req} | "
      f"lr {r['lr']:.4g} | {name} {stat} | loss {r['train_loss']:.4f} | acc {100 * r['test_accuracy']:.2f}% | "
      f"train {r['train_time_s']:.1f}s (compile {r['compile_s']:.1f}s) eval {r['eval_time_s']:.1f}s | steps {r['total_steps']} | "
      f"examples {r['total_examples']} | compiles {r['compilations']} (stall {r['compile_stall_s']:.1f}s) | "
      f"pad {100 * r['padding_fraction']:.1f}%"
  )
