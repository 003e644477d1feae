"""The training loop behind ``divebatch-train``: testable, driven by a TrainConfig.

One run::

    m      = the device batch (measured fastest, or --device-batch)
    policy = build_policy(config, throughput)    # built once, asked for its cadence
    ladder = bucket_ladder(min(b0, m), m)        # one executable per size; a step of
                                                 # b > m rows is ⌈b/m⌉ calls of size m
    tx     = adaptive_batch(..., batch_sizes=ladder.batch_sizes(b_max))   # no padding
    step   = TrainStep(loss, tx, method, policy) # plain / instrumented, BatchNorm aux
    per epoch:  b = current_batch_size(opt_state, epoch=e)
                compile what the epoch needs and has not compiled (CPU; a
                policy that reads no statistics: everything it can reach
                before epoch 1; a background thread compiles everything
                reachable on GPU/TPU),
                kept in OUT/compilation_cache for a resumed run
                for each step: step.run(state, batch, epoch=e)
                evaluate; one metrics.jsonl record (epoch_record); checkpoint

In phases: :func:`_set_up` (data, model, mesh), :func:`_stored_run` (the newest
intact checkpoint, verified once), :func:`_device_batch`, :func:`_engine` (ladder,
transformation, step), :func:`_start` (fresh or restored state), :class:`_Compiler`,
:func:`_run_epoch` and the loop in :func:`_train`.

Nothing here restates a policy: its window decides which epochs are instrumented
(``policy.needs_stats``), its ``decision_steps`` when the batch size is re-read,
and Δ̂, the statistic and the requested batch size are read from the
transformation's state.

Resuming: checkpoints are written at epoch ends (params, optimizer state,
BatchNorm's running averages, and the host state: epoch, sampler position, the
device batch). A run killed anywhere restarts from the last committed checkpoint
and repeats the lost epochs exactly (same seed: same order, same augmentation,
same steps), so its metrics equal the uninterrupted run's except for the timings.
SIGTERM / SIGINT end the step and write a checkpoint of the partly trained epoch
(:class:`EpochProgress` in its host state), from which ``--resume`` continues inside
the epoch. A run holds ``OUT/.lock`` for its life (:mod:`.run_lock`).
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
from divebatch_jax.train import checkpoints, device_batch, methods, metrics, models, parallel, resume, run_lock, safe_files, schema, stopping
from divebatch_jax.compilations import CompileCounter
from divebatch_jax.train.config import TrainConfig, cadence_note, user_errors, validate, validate_against_data
from divebatch_jax.train.datasets import load_dataset
from divebatch_jax.train.lr_schedule import learning_rate, sets_rate_per_step
from divebatch_jax.train.optim import make_optimizer
from divebatch_jax.transform import TrainState, TrainStep, batch_state_summary, current_batch_size, set_hyperparameter
from divebatch_jax.transform.policies import BatchSizePolicy


def _eval_step(graphdef):
  """The jitted evaluation step of ``graphdef``: running (hits, loss sum) over micro-batches."""

  @functools.partial(jax.jit, donate_argnums=2)
  def eval_step(params, rest, totals, data, mask):
    hits, loss_sum = models.eval_sums(graphdef, params, rest, data, mask)
    return totals[0] + hits, totals[1] + loss_sum

  return eval_step


def _evaluate(step, params, rest, pipeline: Pipeline) -> tuple[float, float, float]:
  """(accuracy, mean loss, seconds) of the evaluation ``step`` over every example of
  ``pipeline``'s source, in order; one device-to-host read at the end."""
  start = time.perf_counter()
  pipeline.restore(SamplerState(0, 0))
  totals, total = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), 0
  while True:
    batch = pipeline.next_batch(min(pipeline.ladder.max_size, pipeline.num_examples))
    for data, mask in batch.micro_batches:
      totals = step(params, rest, totals, data, mask)
    total += batch.num_real
    if batch.end_of_epoch:
      hits, loss_sum = jax.device_get(totals)
      return float(hits) / total, float(loss_sum) / total, time.perf_counter() - start


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a run fixes before its first step: the data, the model and where it runs.

  ``rest`` is the model's non-parameter state as built. With BatchNorm it is only
  the starting point: the running averages then live in ``TrainState.aux`` (the one
  place they change); without it ``rest`` is constant. :meth:`model_state` gives
  the current one either way.
  """

  config: TrainConfig  # clamped to the data
  requested: TrainConfig  # the flags as given (config.json)
  data: Any
  graphdef: Any
  params: Any
  rest: Any
  batch_norm: bool
  mesh: Any
  method: str
  loss_fn: Callable
  eval_step: Callable

  @property
  def n(self) -> int:
    return self.data.train.num_examples

  @property
  def devices(self) -> int:
    return self.mesh.size

  @property
  def sharding(self):
    return parallel.batch_sharding(self.mesh)

  def model_state(self, state: TrainState):
    return state.aux if self.batch_norm else self.rest


@dataclasses.dataclass
class Run:
  """What changes between epochs: the device state and the host position."""

  state: TrainState
  epoch: int
  sampler: SamplerState
  partial: "EpochProgress | None" = None  # how far epoch ``epoch`` got before a stop
  records: tuple = ()  # metrics.jsonl's records so far (a checkpoint keeps epochs 1 .. epoch)


class Engine(NamedTuple):
  """The run's layouts, transformation and step for its device batch ``m``."""

  m: int
  ladder: Any
  tx: Any
  step: TrainStep
  policy: BatchSizePolicy


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
  directory.mkdir(mode=0o700, parents=True, exist_ok=True)
  safe_files.check_private_dir(directory, "--compilation-cache")  # code it holds runs here
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
  :class:`stopping.Interrupted`; ``--resume`` continues from inside the epoch. Returns
  the summary dict (also written to ``<out>/summary.json``).
  """
  config = validate(config)
  out = Path(config.out)
  if jax.process_index() > 0:  # every process logs; the others into their own folder
    out = out / f"process_{jax.process_index()}"
  with run_lock.hold(out, echo=echo), _compilation_cache(compilation_cache_dir(config)), stopping.on_signals() as stop:
    compiles = CompileCounter().start()
    try:
      return _train(config, out, compiles, echo, policy, measurer or device_batch.Measurer.from_environment(), stop)
    finally:
      compiles.stop()


def _set_up(config: TrainConfig, echo) -> Setup:
  """Loads the data (checking the flags against it) and builds the model and the mesh."""
  with user_errors(f"--dataset {config.dataset}"):
    data = load_dataset(config)
  for note in data.notes:
    echo(note)
  clamped, notes = validate_against_data(config, data.train.num_examples)
  for note in notes:
    echo(note)
  with user_errors(f"--model {clamped.model} on {data.name}"):
    model = models.create_model(
        clamped.model, input_shape=data.input_shape, num_classes=data.num_classes,
        seed=clamped.seed, norm=clamped.norm, remat=clamped.remat, dtype=clamped.dtype,
    )
  graphdef, params, rest = models.split_model(model)
  batch_norm = models.uses_batch_norm(model)
  loss_fn = models.aux_loss_fn(graphdef) if batch_norm else models.per_example_loss_fn(graphdef, rest)
  return Setup(
      clamped, config, data, graphdef, params, rest, batch_norm, parallel.run_mesh(clamped.mesh, clamped.devices),
      "microbatch" if batch_norm else clamped.stats_method, loss_fn, _eval_step(graphdef),
  )


def _stored_run(setup: Setup, out: Path) -> tuple[int | None, tuple[str, ...], dict | None]:
  """The newest intact checkpoint's step, the damaged ones skipped and its host state
  (``None`` and no host state for a fresh run). Refuses an ``--out`` that holds a run
  unless ``--resume``."""
  config = setup.config
  directory = _checkpoint_dir(config)
  if not config.resume:
    if resume.run_exists(out):
      raise FileExistsError(
          f"--out {out} already holds a run (metrics.jsonl or checkpoints/): pass --resume to "
          "continue it, or choose another --out."
      )
    return None, (), None
  limit = round_up(min(config.max_device_batch or config.max_batch_size, setup.n), setup.devices)
  check_host = functools.partial(schema.host_problem, max_device_batch=limit, num_examples=setup.n)
  with user_errors("--resume"):  # a host.json of the wrong form: that checkpoint is damaged
    step, skipped = checkpoints.intact_step(directory, check_host=check_host)
  if step is None:
    return None, (), None
  return step, skipped, checkpoints.read_host(checkpoints.checkpoint_path(directory, step))


def _checkpoint_dir(config: TrainConfig) -> Path:
  return Path(config.out) / resume.CHECKPOINTS_DIR  # one folder, shared by every process


def _device_batch(setup: Setup, stored_m: int | None, policy, measurer, echo) -> tuple[int, dict[int, float] | None]:
  """The device batch m (stored, pinned or measured: :func:`device_batch.for_run`) and the
  measured rates (goodput chooses among them; None where nothing was measured)."""
  config = setup.config
  aux = setup.rest if setup.batch_norm else None
  chosen = device_batch.for_run(
      measurer,
      lambda: device_batch.plain_step_runner(setup.loss_fn, *parallel.replicate((setup.params, aux), setup.mesh),
                                             setup.data.train, setup.sharding),
      model=(config.model, config.norm, list(setup.data.input_shape)), batch_size=config.batch_size,
      limit=min(config.max_device_batch or config.max_batch_size, setup.n), multiple_of=setup.devices,
      pinned=config.device_batch, restored=stored_m,
      needs_rates=policy is None and methods.method(config.method).needs_rates, echo=echo,
  )
  rates, m = chosen.rates, chosen.size
  if jax.process_count() > 1:  # every process runs process 0's measurement
    rates, m = _agree(rates, m)
  echo(f"device batch m = {m}")
  return m, rates


def _engine(setup: Setup, m: int, policy, rates) -> Engine:
  """Layouts of device batch ``m``, the transformation (its sizes fill whole micro-batches
  under ``--round-batch``) and the step."""
  config = setup.config
  if policy is None:  # goodput chooses among the layouts measured, up to m
    with user_errors(f"--method {config.method}"):
      policy = methods.build_policy(config, {s: r for s, r in (rates or {}).items() if s <= m})
  ladder = bucket_ladder(min(config.batch_size, m), m, multiple_of=setup.devices)
  sizes = ladder.batch_sizes(min(config.max_batch_size, setup.n)) if config.round_batch else None
  tx = make_optimizer(config, setup.n, policy, sizes)
  step = TrainStep(setup.loss_fn, tx, method=setup.method, policy=policy, has_aux=setup.batch_norm)
  return Engine(m, ladder, tx, step, policy)


def _start(setup: Setup, engine: Engine, stored_step: int | None, skipped, echo) -> Run:
  """The run's state: fresh, or restored from the checkpoint ``stored_step``."""
  aux = setup.rest if setup.batch_norm else None
  # Parameters laid out by their logical axes on the mesh; the step puts the rest of the
  # state on their shardings.
  state = engine.step.init(parallel.place_params(setup.params, setup.mesh), parallel.replicate(aux, setup.mesh))
  run = Run(state, 0, SamplerState(0, 0))
  if stored_step is None:
    if setup.config.resume:
      echo(f"--resume: no committed checkpoint in {_checkpoint_dir(setup.config)}; starting from scratch")
    return run
  for line in skipped:
    echo(line)
  target = {"params": state.params, "opt_state": state.opt_state, "rest": setup.model_state(state)}
  with user_errors("--resume"):
    restored = checkpoints.restore_checkpoint(_checkpoint_dir(setup.config), target, step=stored_step, verified=True)
  device = parallel.place_like(restored.state, target, setup.mesh)
  host = restored.host
  partial = EpochProgress(**host["partial"]) if host.get("partial") else None
  inside = f", step {partial.steps} of epoch {host['epoch'] + 1}" if partial else ""
  echo(f"resumed from {_checkpoint_dir(setup.config)} at epoch {host['epoch']}{inside}")
  aux = device["rest"] if setup.batch_norm else None
  return Run(TrainState(device["params"], device["opt_state"], aux), host["epoch"],
             SamplerState(*host["sampler"]), partial)


def _shapes(sharding, source, rows: int) -> tuple[dict, jax.ShapeDtypeStruct]:
  """Abstract ``(data, mask)`` of one micro-batch of ``rows`` rows (for compiling ahead)."""
  data = {
      name: jax.ShapeDtypeStruct((rows, *spec.shape), spec.dtype, sharding=sharding)
      for name, spec in source.element_spec.items()
  }
  return data, jax.ShapeDtypeStruct((rows,), jnp.bool_, sharding=sharding)


class _Compiler:
  """Compiles the executables of the run's steps before the epochs that need them.

  * GPU/TPU hosts (cores to spare): one background thread compiles every layout the
    policy can reach in every variant (plain / instrumented) the run's epochs can
    need, soonest first, while training runs; a step that gets there first waits
    for it (``compile_stall_s``).
  * CPU, a policy that decides at epoch ends: before each epoch, what that epoch
    uses and has not compiled yet (its batch size's layout in its variant). The
    run compiles only what it reaches: DiveBatch's first epoch compiles one layout,
    as SGD's does (compiling every reachable layout in both variants first had made
    its start several times SGD's on the default job).
  * CPU, a policy that decides within epochs, or one that never reads statistics
    (AdaBatch, SEBS, ramps: its sizes follow its schedule and it reaches what it
    can reach): everything it can reach, in its one variant, before the first epoch,
    so no epoch after a resize waits for a compile (a background thread falls behind
    there: compiling and training share the same few cores).
    benchmarks/results/compile_path_cpu.md measures the choice.

  On the CPU nothing compiles inside an epoch; :meth:`before_epoch` returns the
  seconds it compiled (``compile_s`` in the record, apart from training time).
  """

  def __init__(self, setup: Setup, engine: Engine, state: TrainState, pipelines):
    self.setup, self.engine, self.pipelines = setup, engine, pipelines
    self.error = None
    self._abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    config, ladder, policy = setup.config, engine.ladder, engine.policy
    self._device = self._shape(engine.m) if min(config.max_batch_size, setup.n) > engine.m else None
    self._evaluation_done = False
    self._everything_done = False  # a within-epoch decider's one compile of all it can reach
    b = current_batch_size(state.opt_state)
    now = ladder.shape_for(b)[1]
    # a constant batch: b0's layout and the last, partial step's
    reachable = ladder.sizes if policy.max_batch_size is not None else {ladder.shape_for(r)[1] for r in (b, setup.n % b or b)}
    self._soonest_first = sorted(reachable, key=lambda s: (s < now, abs(s - now)))
    self._thread = None
    if jax.default_backend() != "cpu":
      self._thread = threading.Thread(target=self._everything, name="divebatch-precompile", daemon=True)
      self._thread.start()

  def _shape(self, rows: int):
    return _shapes(self.setup.sharding, self.setup.data.train, rows)

  def _compile(self, sizes, variants) -> None:
    train_pipeline, eval_pipeline = self.pipelines
    try:
      if not self._evaluation_done:
        eval_pipeline.precompile(eval_pipeline.ladder.sizes)
        self._evaluation_done = True
      train_pipeline.precompile(sizes)
      device = self._device if self._device is not None and self.engine.m in sizes else None
      self.engine.step.precompile(
          self._abstract, layouts=[self._shape(s) for s in sizes], micro_batch=device, instrumented=variants
      )
    except Exception as err:  # the step compiles on demand instead  # noqa: BLE001
      self.error = self.error or err

  def _everything(self) -> None:
    variants = {bool(self.engine.policy.needs_stats(e)) for e in range(self.setup.config.epochs)}
    self._compile(self._soonest_first, tuple(sorted(variants)))

  def before_epoch(self, epoch: int, batch_size: int) -> float:
    """Compiles what ``epoch`` needs at ``batch_size`` (CPU); the seconds it took."""
    if self._thread is not None or self._everything_done:
      return 0.0
    start = time.perf_counter()
    policy = self.engine.policy
    never_measures = not any(policy.needs_stats(e) for e in range(self.setup.config.epochs))
    if policy.decision_steps or never_measures:  # all it can reach, once
      self._everything()
      self._everything_done = True
    else:  # the epoch's steps of batch_size rows, and its last, partial one
      last = self.setup.n % batch_size or batch_size
      sizes = sorted({self.engine.ladder.shape_for(rows)[1] for rows in (batch_size, last)}, reverse=True)
      self._compile(sizes, (bool(self.engine.policy.needs_stats(epoch)),))
    return time.perf_counter() - start

  def join(self) -> None:
    if self._thread is not None:
      self._thread.join()


class EpochTotals(NamedTuple):
  """One epoch's training on the host's clock (the loss a device scalar until read);
  ``finished`` False when a stop request ended it early at ``batch_size`` after
  ``examples`` real examples."""

  loss_sum: jax.Array
  steps: int
  rows: int
  seconds: float
  finished: bool = True
  batch_size: int = 0
  examples: int = 0


class EpochProgress(NamedTuple):
  """How far an epoch got: what a mid-epoch checkpoint keeps to continue it exactly (the
  batch size in use, the transformation's summary at the epoch's start, steps, padded
  rows and real examples so far, the float32 loss sum, training seconds)."""

  batch_size: int
  start_summary: dict
  steps: int
  rows: int
  examples: int
  loss_sum: float
  seconds: float


def _train_epoch(engine: Engine, run: Run, pipeline: Pipeline, bar, partial: EpochProgress | None,
                 stop: stopping.StopRequest, set_rate=None) -> EpochTotals:
  """Steps through one epoch of ``pipeline`` (from ``partial`` when it continues one) at the
  state's batch size, re-read after the policy's decision steps (every
  ``decision_steps``-th step of the run); ``run.state`` and ``run.sampler`` advance.
  ``set_rate(steps, examples)``, when given, sets the rate before every step after the
  first (steps and examples of this epoch before it). A stop request ends the epoch
  after the current step (``finished`` False)."""
  policy, epoch = engine.policy, run.epoch
  if partial is None:
    partial = EpochProgress(current_batch_size(run.state.opt_state, epoch=epoch), {}, 0, 0, 0, 0.0, 0.0)
  batch_size, steps, rows, seen = partial.batch_size, partial.steps, partial.rows, partial.examples
  steps_before = batch_state_summary(run.state.opt_state)["step"] - steps if policy.decision_steps else 0
  loss_sum = jnp.asarray(partial.loss_sum, jnp.float32)
  start = time.perf_counter() - partial.seconds
  while True:
    if steps and set_rate is not None:
      set_rate(steps, seen)
    batch = pipeline.next_batch(batch_size)
    run.state, result = engine.step.run(run.state, batch, epoch=epoch)
    loss_sum = loss_sum + result.loss * result.count
    steps, rows, seen = steps + 1, rows + batch.shape[0] * batch.shape[1], seen + batch.num_real
    if bar is not None:
      bar.update(batch.num_real)
    if batch.end_of_epoch:
      break
    if policy.decision_steps and (steps_before + steps) % policy.decision_steps == 0:
      batch_size = current_batch_size(run.state.opt_state)
    if stop.signum is not None:
      break
  jax.block_until_ready(loss_sum)
  run.sampler = pipeline.state
  return EpochTotals(loss_sum, steps, rows, time.perf_counter() - start, batch.end_of_epoch, batch_size, seen)


def epoch_record(
    *, epoch: int, method: str, lr: float, instrumented: bool, start: dict, end: dict,
    totals: EpochTotals, n: int, evaluation: tuple[float, float, float], compiles: tuple[int, float, float],
    layout: dict,
) -> dict:
  """The ``metrics.jsonl`` record of 0-based ``epoch`` (pure).

  ``start`` / ``end``: :func:`batch_state_summary` at the epoch's start and end;
  ``evaluation``: (accuracy, test loss, seconds); ``compiles``: this epoch's XLA
  compilations (count, seconds the steps waited on them, seconds compiling before
  the epoch's first step); ``layout``: device batch, devices, processes. Times::

      train_time_s = before + the steps' seconds     compile_s = before + waited

  so ``train_time_s − compile_s`` is the steps' own time. The statistic and the
  requested size are recorded where the epoch measured and decided.
  """
  accuracy, test_loss, eval_time = evaluation
  count, waited, before = compiles
  decided = end["decisions"] > start["decisions"]
  statistic = _finite_or_none(end["statistic"]) if instrumented and decided else None
  return {
      "epoch": epoch + 1,
      "batch_size": start["batch_size"],
      "last_batch_size": totals.batch_size or start["batch_size"],
      "next_batch_size": end["batch_size"],
      "lr": start["learning_rate"] if start["learning_rate"] is not None else lr,
      "diversity": statistic if methods.method(method).statistic == methods.DIVERSITY else None,
      "requested_batch_size": _finite_or_none(end["requested"]) if decided else None,
      "statistic": statistic,
      "train_loss": float(totals.loss_sum) / n,
      "test_loss": test_loss,
      "test_accuracy": accuracy,
      "train_time_s": totals.seconds + before,
      "eval_time_s": eval_time,
      "steps": totals.steps,
      "examples": n,
      "compilations": count,
      "compile_stall_s": waited,
      "compile_s": before + waited,
      "total_steps": end["step"],
      "total_examples": end["examples_seen"],
      "padding_fraction": 1.0 - n / totals.rows,
      "device_batch": layout["device_batch"],
      "devices": layout["devices"],
      "processes": layout["processes"],
      "mesh": layout.get("mesh"),
  }


def _pipelines(setup: Setup, engine: Engine) -> tuple[Pipeline, Pipeline]:
  config, devices, sharding = setup.config, setup.devices, setup.sharding
  augment = CropFlip() if setup.data.augment else None
  train = Pipeline(setup.data.train, ladder=engine.ladder, seed=config.seed, augment=augment, device=sharding)
  eval_rows = round_up(min(config.eval_batch_size, setup.data.test.num_examples), devices)
  test = Pipeline(
      setup.data.test, ladder=bucket_ladder(eval_rows, eval_rows, multiple_of=devices),
      shuffle=False, prefetch=0, device=sharding,
  )
  return train, test


def _header(setup: Setup, engine: Engine) -> str:
  config, data, policy = setup.config, setup.data, engine.policy
  measured = any(policy.needs_stats(e) for e in range(config.epochs))
  return (
      f"{config.method} | {config.model} on {data.name} (n={setup.n}, test={data.test.num_examples}) | "
      f"b0={config.batch_size} b_max={config.max_batch_size} device batch m={engine.m} "
      f"layouts={list(engine.ladder.sizes)} then x{engine.m} | devices={setup.devices} "
      f"mesh={parallel.describe_mesh(setup.mesh)} "
      f"processes={jax.process_count()} | statistics: {setup.method if measured else 'none'}"
      + (" (BatchNorm: micro-batch statistics)" if setup.batch_norm and measured else "")
  )


def _save(setup: Setup, engine: Engine, run: Run, partial: EpochProgress | None = None) -> None:
  """Checkpoint ``run.epoch`` (completed epochs), with the partial epoch's progress if any."""
  state = run.state
  host = {"epoch": run.epoch, "sampler": list(run.sampler), "device_batch": engine.m,
          "records": list(run.records[:run.epoch])}  # to repair metrics.jsonl on --resume
  if partial is not None:
    host["partial"] = json.loads(json.dumps(partial._asdict(), default=float))  # numpy scalars as floats
  checkpoints.save_checkpoint(
      _checkpoint_dir(setup.config), run.epoch,
      {"params": state.params, "opt_state": state.opt_state, "rest": setup.model_state(state)}, host,
  )


def _stopped_line(signum: int, config: TrainConfig, where: str) -> str:
  return (f"stopped by {stopping.describe(signum)} {where}; checkpoint written: continue with "
          f"divebatch-train --out {config.out} --resume")


def _run_epoch(setup: Setup, engine: Engine, run: Run, compiler: _Compiler, pipelines, progress, compiles_before: int, compiles: CompileCounter, stop) -> dict:
  """Trains and evaluates epoch ``run.epoch`` (``run`` advances); its record. A stop
  request inside the epoch writes a mid-epoch checkpoint and raises :class:`stopping.Interrupted`."""
  config, epoch = setup.config, run.epoch
  train_pipeline, eval_pipeline = pipelines
  partial, run.partial = run.partial, None
  counters = batch_state_summary(run.state.opt_state) if partial is None else partial.start_summary

  def set_rate(steps: int, examples: int) -> float:  # the schedule at the run's step and example
    rate = learning_rate(config, epoch=epoch, step=counters["step"] + steps,
                         examples=counters["examples_seen"] + examples, num_examples=setup.n)
    run.state = run.state._replace(opt_state=set_hyperparameter(run.state.opt_state, "learning_rate", rate))
    return rate

  lr = set_rate(0, 0)  # a continued epoch: its rate before the next step is set again below
  start = batch_state_summary(run.state.opt_state) if partial is None else partial.start_summary
  ahead = compiler.before_epoch(epoch, start["batch_size"])  # charged to the epoch's training time
  stalls_before = _stalls(engine.step, train_pipeline)
  bar = progress(total=setup.n, desc=f"epoch {epoch}", leave=False, unit="ex") if progress else None
  totals = _train_epoch(engine, run, train_pipeline, bar, partial, stop,
                        set_rate if sets_rate_per_step(config) else None)
  if bar is not None:
    bar.close()
  if not totals.finished:  # stopped inside the epoch: keep its progress, then stop
    _save(setup, engine, run, EpochProgress(totals.batch_size, start, totals.steps, totals.rows,
                                            totals.examples, float(totals.loss_sum), totals.seconds))
    raise stopping.Interrupted(stop.signum, _stopped_line(stop.signum, config, f"after step {totals.steps} of epoch {epoch + 1}"))
  evaluation = _evaluate(setup.eval_step, run.state.params, setup.model_state(run.state), eval_pipeline)
  stall = _stalls(engine.step, train_pipeline) - stalls_before
  record = epoch_record(
      epoch=epoch, method=config.method, lr=lr, instrumented=bool(engine.policy.needs_stats(epoch)),
      start=start, end=batch_state_summary(run.state.opt_state), totals=totals, n=setup.n,
      evaluation=evaluation, compiles=(compiles.count - compiles_before, stall, ahead),
      layout={"device_batch": engine.m, "devices": setup.devices, "processes": jax.process_count(),
              "mesh": parallel.describe_mesh(setup.mesh)},
  )
  if setup.data.tokens_per_example:  # a language model: tokens and bits per character
    record.update(metrics.token_fields(record, setup.data.tokens_per_example))
  return record


def _train(config: TrainConfig, out: Path, compiles: CompileCounter, echo, policy, measurer, stop) -> dict:
  setup = _set_up(config, echo)
  config = setup.config
  stored_step, skipped, host = _stored_run(setup, out)
  if host is not None:  # metrics.jsonl against the checkpoint, before any training
    resume.reconcile_metrics(out / metrics.METRICS_FILE, host, echo)
  m, rates = _device_batch(setup, host.get("device_batch") if host else None, policy, measurer, echo)
  engine = _engine(setup, m, policy, rates)
  run = _start(setup, engine, stored_step, skipped, echo)
  resume.write_config(out, setup.requested)
  with user_errors(f"--resume: {out / metrics.METRICS_FILE}"):
    log = metrics.MetricsWriter(out / metrics.METRICS_FILE)
  run.records = tuple(log.records)
  train_pipeline, eval_pipeline = pipelines = _pipelines(setup, engine)
  compiler = _Compiler(setup, engine, run.state, pipelines)
  train_pipeline.restore(run.sampler)
  echo(_header(setup, engine))
  if (note := cadence_note(config, engine.policy.needs_stats)) is not None:
    echo(note)
  board = _board(config)
  progress, diverged_at, counted = _progress(config), None, 0  # epoch 1 counts the measurement's compiles
  try:
    while run.epoch < config.epochs:
      record = _run_epoch(setup, engine, run, compiler, pipelines, progress, counted, compiles, stop)
      counted = compiles.count
      message = metrics.check_finite(record)
      if message is not None:  # stop before a non-finite state is logged or saved
        echo(message)
        diverged_at = run.epoch + 1
        break
      if not log.write(record):  # a resumed run repeats epochs the file already holds
        record = log.records[run.epoch]
      elif board is not None:
        board.write(log.records[-1])  # as metrics.jsonl holds it
      run.records = tuple(log.records)
      echo(_format_record(record))
      run.epoch += 1
      if run.epoch % config.checkpoint_every == 0 or run.epoch == config.epochs or stop.signum is not None:
        _save(setup, engine, run)
      if stop.signum is not None and run.epoch < config.epochs:
        raise stopping.Interrupted(stop.signum, _stopped_line(stop.signum, config, f"after epoch {run.epoch}"))
  finally:
    compiler.join()
    train_pipeline.close()
    eval_pipeline.close()
    log.close()
    if board is not None:
      board.close()
  if compiler.error is not None:
    echo(f"note: compiling ahead failed ({compiler.error}); the steps compiled on demand")
  summary = metrics.write_summary(out, diverged_at_epoch=diverged_at)
  return dict(summary, method=config.method, model=config.model, dataset=setup.data.name, out=str(out))


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


def _finite_or_none(value):
  return None if value is None or not math.isfinite(value) else float(value)


def _format_record(r: dict) -> str:
  stat = "-" if r["statistic"] is None else f"{r['statistic']:.4g}"
  req = "" if r["requested_batch_size"] is None else f" (asked {r['requested_batch_size']:.0f})"
  name = "Δ̂" if r["diversity"] is not None else "stat"
  return (
      f"epoch {r['epoch']:3d} | b {r['batch_size']:5d} -> {r['next_batch_size']:5d}{req} | "
      f"lr {r['lr']:.4g} | {name} {stat} | loss {r['train_loss']:.4f} | acc {100 * r['test_accuracy']:.2f}% | "
      f"train {r['train_time_s']:.1f}s (compile {r['compile_s']:.1f}s) eval {r['eval_time_s']:.1f}s | "
      f"steps {r['steps']} (total {r['total_steps']}) | total examples {r['total_examples']} | compiles {r['compilations']} (stall {r['compile_stall_s']:.1f}s) | "
      f"pad {100 * r['padding_fraction']:.1f}%"
      + (f" | test loss {r['test_loss']:.4f} nats/token ({r['bits_per_char']:.3f} bits/char) | "
         f"total tokens {r['total_tokens']}" if "bits_per_char" in r else "")
  )
