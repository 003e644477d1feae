"""The device batch: how many rows one call of the step evaluates, chosen by measurement.

The statistical batch b (what a policy decides) and the device batch m (what one
call of the step evaluates) are different numbers: a step of b > m rows runs as
⌈b/m⌉ calls of the same executable (``TrainStep.accumulate``), so growing b never
makes an example dearer than at m. Which m is fastest depends on the backend and
the model — on an H100 examples/s grow with the device batch up to thousands of
rows, on a 2-core CPU a SmallCNN runs fastest at a few dozen
(benchmarks/results/device_batch_{cpu,gpu}.md) — so it is measured: the plain
step at each candidate size (doubling from the smallest), stopping once
throughput has fallen twice in a row or memory would run out, and m is the
smallest size within ``tolerance`` of the best rate (a smaller m lays out more
batch sizes without padding).

m shapes a run (the batch sizes laid out without padding, the float summation
order, BatchNorm's groups), so a :class:`Measurer` keeps the rates it measured in
``device_batch.json`` under its cache directory and later runs of the same model,
input shape, backend and device count reuse them. What it reads is checked
(:func:`problem_with`: the candidate sizes measured in order, finite positive
rates, a step time that does not fall as the batch grows); a bad entry is
measured again and rewritten. A measurement is kept only when two in a row
agree (the same m, every rate within ``agreement``), so one taken while the
machine was busy is not kept forever::

    measurer = Measurer.from_environment()          # $DIVEBATCH_CACHE_DIR, "off": keep nothing
    rates = measurer.rates(key, plain_step_runner(loss_fn, params, None, source, sharding), sizes)
    fastest(rates)                                  # m

Turn the cache off with ``DIVEBATCH_CACHE_DIR=off`` (every run measures); pin m
with ``--device-batch M`` (``TrainConfig(device_batch=M)``), which also skips the
measurement unless the method needs the rates (goodput).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from divebatch_jax.data.buckets import round_up
from divebatch_jax.stats import mean_loss_and_grad, micro_batch_sums
from divebatch_jax.train import safe_files

CACHE_FILE = "device_batch.json"
ENV_CACHE_DIR = "DIVEBATCH_CACHE_DIR"
CACHE_OFF = "off"
# A step of twice the rows may take at most this much less time than the smaller one
# before the curve counts as implausible (timing noise at tiny sizes stays below it).
STEP_TIME_SLACK = 0.2

RunAt = Callable[[int], Callable[[], None]]


class DeviceBatch(NamedTuple):
  """The run's device batch ``size`` (m), the rates measured (None when none were needed)
  and where m came from: ``"measured"``, ``"--device-batch"`` or ``"checkpoint"``."""

  size: int
  rates: dict[int, float] | None
  origin: str


def candidate_sizes(smallest: int, largest: int) -> list[int]:
  """``smallest · 2^i`` below ``largest``, then ``largest``."""
  sizes, size = [], smallest
  while size < largest:
    sizes.append(size)
    size *= 2
  return sizes + [largest]


def _rate(run: Callable[[], None], size: int, steps: int, min_seconds: float) -> float:
  """Examples/s over at least ``steps`` steps and ``min_seconds`` (sub-millisecond steps
  timed a few at a time are noise), after two warm-up steps (the first compiles, the
  second may compile again for the committed outputs of the first)."""
  run()
  run()
  start, done = time.perf_counter(), 0
  while done < steps or time.perf_counter() - start < min_seconds:
    run()
    done += 1
  return done * size / (time.perf_counter() - start)


def choose_device_batch(
    run_at: RunAt,
    sizes: list[int],
    *,
    steps: int = 3,
    min_seconds: float = 0.05,
    tolerance: float = 0.05,
    log: Callable[[str], None] = lambda line: None,
) -> tuple[int, dict[int, float]]:
  """``(m, {size: examples/s})``: the smallest measured size within ``tolerance`` of the best.

  ``run_at(size)`` returns a function running one plain step of ``size`` rows and
  waiting for it; each size runs at least ``steps`` steps and ``min_seconds``. Sizes are tried in ascending order; the search stops after two
  sizes in a row slower than the best so far, or when a step runs out of memory.
  """
  rates: dict[int, float] = {}
  slower = 0
  for size in sizes:
    try:
      rates[size] = _rate(run_at(size), size, steps, min_seconds)
    except jax.errors.JaxRuntimeError as err:  # out of device memory: stop growing
      log(f"device batch {size}: {str(err).splitlines()[0]}")
      break
    log(f"device batch {size}: {rates[size]:,.0f} examples/s")
    slower = slower + 1 if rates[size] < max(rates.values()) else 0
    if slower == 2:
      break
  return fastest(rates, tolerance), rates


def fastest(rates: dict[int, float], tolerance: float = 0.05) -> int:
  """The smallest size whose rate is within ``tolerance`` of the best."""
  best = max(rates.values())
  return min(size for size, rate in rates.items() if rate >= (1.0 - tolerance) * best)


def problem_with(rates, sizes: list[int]) -> str | None:
  """Why ``rates`` cannot be a measurement over the candidate ``sizes`` (None: it can).

  A measurement covers the first k of ``sizes`` in order (k >= 1: the search stops
  early, never skips), each rate a finite number > 0 (examples/s), and its step
  time ``size / rate`` never falls by more than :data:`STEP_TIME_SLACK` from one
  size to the next (a step of more rows cannot take much less time):

  >>> problem_with({8: 100.0, 16: 190.0}, [8, 16, 32]) is None
  True
  >>> problem_with({8: 100.0, 64: 5.0}, [8, 16, 32])
  'sizes [8, 64] are not the first of the candidate sizes [8, 16, 32]'
  >>> problem_with({8: 1000.0, 16: 4000.0}, [8, 16, 32])
  'a step of 16 rows took less time than one of 8 (0.004 s < 0.008 s)'
  """
  if not isinstance(rates, dict) or not rates:
    return f"expected a non-empty object of size: examples/s, got {rates!r}"
  if list(rates) != sizes[: len(rates)]:
    return f"sizes {list(rates)} are not the first of the candidate sizes {sizes}"
  values = list(rates.values())
  if not all(isinstance(r, float) and math.isfinite(r) and r > 0 for r in values):
    return f"rates must be finite numbers > 0, got {values}"
  times = [size / rate for size, rate in rates.items()]
  for (small, t_small), (large, t_large) in zip(zip(rates, times), zip(list(rates)[1:], times[1:])):
    if t_large < (1.0 - STEP_TIME_SLACK) * t_small:
      return f"a step of {large} rows took less time than one of {small} ({t_large:.2g} s < {t_small:.2g} s)"
  return None


def agree(a: dict[int, float], b: dict[int, float], tolerance: float) -> bool:
  """Two measurements agree: the same m and every size both measured within ``tolerance``."""
  common = [s for s in a if s in b]
  return fastest(a) == fastest(b) and all(abs(a[s] - b[s]) <= tolerance * max(a[s], b[s]) for s in common)


def _parse(entry) -> dict[int, float] | None:
  """A stored entry as ``{int: float}`` in its stored order (None when not of that form)."""
  try:
    return {int(s): float(r) for s, r in entry.items()}
  except (AttributeError, TypeError, ValueError):
    return None


@dataclasses.dataclass(frozen=True)
class Measurer:
  """Measures device-batch rates and keeps them in ``cache_dir/device_batch.json``.

  ``cache_dir`` None keeps nothing (every run measures). ``time_rates(run_at,
  sizes)`` times the candidates (default :func:`choose_device_batch` with
  ``steps``); a measurement is repeated up to ``attempts`` times until two in a
  row are plausible and :func:`agree` within ``agreement``. When none agree the
  last plausible one serves this run and is not kept.
  """

  cache_dir: Path | None
  steps: int = 3
  attempts: int = 4
  agreement: float = 0.25
  time_rates: Callable[[RunAt, list[int]], dict[int, float]] | None = None

  @classmethod
  def from_environment(cls) -> "Measurer":
    """``$DIVEBATCH_CACHE_DIR`` (``off``: keep nothing), else ``~/.cache/divebatch_jax``."""
    value = os.environ.get(ENV_CACHE_DIR)
    if value == CACHE_OFF:
      return cls(None)
    return cls(Path(value) if value else Path.home() / ".cache" / "divebatch_jax")

  def _stored(self) -> dict:
    """Every stored entry by key ({} when absent, unreadable or not an object)."""
    try:
      known = json.loads(safe_files.read_text(self.cache_dir / CACHE_FILE))
    except (OSError, ValueError, TypeError):
      return {}
    return known if isinstance(known, dict) else {}

  def read(self, key: str, sizes: list[int]) -> tuple[dict[int, float] | None, str | None]:
    """``(rates, None)`` for a valid stored entry, ``(None, why)`` for an invalid one, ``(None, None)``."""
    if self.cache_dir is None or key not in (stored := self._stored()):
      return None, None
    rates = _parse(stored[key])
    problem = problem_with(rates if rates is not None else stored[key], sizes)
    return (rates, None) if problem is None else (None, problem)

  def measure(self, run_at: RunAt, sizes: list[int]) -> tuple[dict[int, float], bool]:
    """``(rates, agreed)``: repeated until two plausible measurements in a row agree."""
    time_rates = self.time_rates or (lambda run, s: choose_device_batch(run, s, steps=self.steps)[1])
    previous = last = None
    for _ in range(self.attempts):
      rates = time_rates(run_at, sizes)
      if problem_with(rates, sizes) is not None:
        previous = None
        continue
      if previous is not None and agree(previous, rates, self.agreement):
        return rates, True
      previous = last = rates
    return (last if last is not None else rates), False

  def rates(self, key: str, run_at: RunAt, sizes: list[int], echo: Callable[[str], None] = print) -> dict[int, float]:
    """The valid stored rates under ``key``, else measured (and kept when two agreed)."""
    rates, problem = self.read(key, sizes)
    if rates is not None:
      return rates
    if problem is not None:
      echo(f"note: the stored device-batch measurement in {self.cache_dir / CACHE_FILE} is invalid ({problem}); measuring again")
    measured, agreed = self.measure(run_at, sizes)
    if not agreed:
      echo("note: the device-batch measurements disagreed (a busy machine?); this run uses the last "
           "one and keeps none: pin m with --device-batch for comparable runs")
      return measured
    return self._keep(key, measured, sizes, echo)

  def _keep(self, key: str, rates: dict[int, float], sizes: list[int], echo) -> dict[int, float]:
    """Stores ``rates`` unless another process stored a valid entry meanwhile (returned instead)."""
    if self.cache_dir is None:
      return rates
    theirs, _ = self.read(key, sizes)
    if theirs is not None:
      return theirs
    stored = self.cache_dir / CACHE_FILE
    try:
      stored.parent.mkdir(parents=True, exist_ok=True)
      safe_files.write_atomic(stored, json.dumps({**self._stored(), key: rates}, indent=1))
    except OSError as err:  # a read-only or full home: measure again next time
      echo(f"note: could not keep the device-batch measurement in {stored}: {err}")
    return rates


def plain_step_runner(loss_fn, params, aux, source, sharding) -> RunAt:
  """``run_at(size)`` for :func:`choose_device_batch`: a plain SGD step of the model on the
  first ``size`` rows of ``source`` (params and aux placed as the step will hold them)."""

  @jax.jit
  def plain_sgd(params, aux, batch, mask):
    sums, aux = micro_batch_sums(loss_fn, params, batch, mask, aux=aux)
    _, grad = mean_loss_and_grad(sums, params)
    return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grad), aux

  probe = {"state": jax.tree.map(jnp.copy, (params, aux))}

  def run_at(size):
    rows = source.gather(np.arange(size) % source.num_examples)
    batch = jax.device_put({"x": rows["x"], "y": rows["y"]}, sharding)
    mask = jax.device_put(np.ones(size, bool), sharding)

    def run():
      probe["state"] = plain_sgd(*probe["state"], batch, mask)
      jax.block_until_ready(probe["state"])

    return run

  return run_at


def for_run(
    measurer: Measurer,
    make_runner: Callable[[], RunAt],
    *,
    model: tuple,
    batch_size: int,
    limit: int,
    multiple_of: int,
    pinned: int | None,
    restored: int | None,
    needs_rates: bool,
    echo: Callable[[str], None] = print,
) -> DeviceBatch:
  """The device batch of one run: ``restored`` (a resumed run's), else ``pinned`` (rounded
  up to ``multiple_of``, at most ``limit``), else the fastest measured size.

  Candidates double from ``batch_size`` (at most ``limit``) to ``limit``, both rounded up
  to ``multiple_of`` (the device count). Rates are measured (or read) only when m is
  neither restored nor pinned, or when ``needs_rates``; ``model`` (JSON-able) names what
  is measured, with the backend and device kind added to the stored key.
  """
  smallest = round_up(min(batch_size, limit), multiple_of)
  sizes = candidate_sizes(smallest, round_up(limit, multiple_of))
  rates = None
  if needs_rates or (restored is None and pinned is None):
    key = json.dumps([jax.default_backend(), jax.devices()[0].device_kind, *model, multiple_of, sizes])
    rates = measurer.rates(key, make_runner(), sizes, echo)
    echo("device batch: " + ", ".join(f"{s}: {r:,.0f}/s" for s, r in rates.items()))
  if restored is not None:
    return DeviceBatch(restored, rates, "checkpoint")
  if pinned is not None:
    return DeviceBatch(round_up(min(pinned, limit), multiple_of), rates, "--device-batch")
  return DeviceBatch(fastest(rates), rates, "measured")
