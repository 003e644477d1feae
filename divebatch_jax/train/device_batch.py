"""The device batch: how many rows one call of the step evaluates, chosen by measurement.

The statistical batch b (what a policy decides) and the device batch m (what one
call of the step evaluates) are different numbers: a step of b > m rows runs as
⌈b/m⌉ calls of the same executable (``TrainStep.accumulate``), so growing b never
makes an example dearer than at m. Which m is fastest depends on the backend and
the model — on an H100 examples/s grow with the device batch up to thousands of
rows, on a 2-core CPU a SmallCNN runs fastest at a few dozen
(benchmarks/results/device_batch_{cpu,gpu}.md) — so :func:`choose_device_batch`
measures it: the plain step at each candidate size (doubling from the smallest),
stopping once throughput has fallen twice in a row or memory would run out, and
takes the smallest size within ``tolerance`` of the best rate (a smaller m lays
out more batch sizes without padding).
"""

from __future__ import annotations

import time
from typing import Callable

import jax


def candidate_sizes(smallest: int, largest: int) -> list[int]:
  """``smallest · 2^i`` below ``largest``, then ``largest``."""
  sizes, size = [], smallest
  while size < largest:
    sizes.append(size)
    size *= 2
  return sizes + [largest]


def _rate(run: Callable[[], None], size: int, steps: int) -> float:
  run()  # warm-up (compiles)
  start = time.perf_counter()
  for _ in range(steps):
    run()
  return steps * size / (time.perf_counter() - start)


def choose_device_batch(
    run_at: Callable[[int], Callable[[], None]],
    sizes: list[int],
    *,
    steps: int = 3,
    tolerance: float = 0.05,
    log: Callable[[str], None] = lambda line: None,
) -> tuple[int, dict[int, float]]:
  """``(m, {size: examples/s})``: the smallest measured size within ``tolerance`` of the best.

  ``run_at(size)`` returns a function running one plain step of ``size`` rows and
  waiting for it. Sizes are tried in ascending order; the search stops after two
  sizes in a row slower than the best so far, or when a step runs out of memory.
  """
  rates: dict[int, float] = {}
  slower = 0
  for size in sizes:
    try:
      rates[size] = _rate(run_at(size), size, steps)
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
