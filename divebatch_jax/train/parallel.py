"""Data parallelism on JAX's own SPMD machinery: a mesh, shardings, multi-host start-up.

Nothing here communicates by hand. Each micro-batch ``(m, ...)`` of a step is
sharded over the mesh's ``"data"`` axis along its rows (each device holds ``m / D``
rows, padded rows included, masked); parameters and optimizer state are
replicated. The jitted step is then partitioned by XLA: per-example
gradients are computed where their rows live, and every sum over the batch —
the mean gradient, ``count``, ``sum_g``, ``sum_sq``, ``sum_ip`` — becomes an
all-reduce, so the statistics are those of the *global* batch and equal the
single-device values for the same batch (up to float summation order).

(We do not use ``shard_map`` for the step: under it, with the default checks,
the gradient with respect to a replicated parameter is implicitly summed across
devices, which would mix the per-example gradients of different devices into
each ``g_i``; jit with ``NamedSharding`` has no such trap.)

Multi-host: :func:`initialize_distributed` wraps ``jax.distributed.initialize``;
every process runs the same program, reads the same sampler order and gathers
only its own rows of each global batch (``jax.make_array_from_process_local_data``),
see :class:`divebatch_jax.data.Pipeline`. A two-host launch::

    # host 0                                     # host 1
    DIVEBATCH_COORDINATOR=10.0.0.1:1234 \\        DIVEBATCH_COORDINATOR=10.0.0.1:1234 \\
    DIVEBATCH_NUM_PROCESSES=2 \\                   DIVEBATCH_NUM_PROCESSES=2 \\
    DIVEBATCH_PROCESS_ID=0 \\                      DIVEBATCH_PROCESS_ID=1 \\
    divebatch-train --distributed --devices all   divebatch-train --distributed --devices all

(On clusters that JAX detects — SLURM, Open MPI, Cloud TPU — the variables can be
left out: ``jax.distributed.initialize()`` finds them itself.)
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
ENV_COORDINATOR = "DIVEBATCH_COORDINATOR"
ENV_NUM_PROCESSES = "DIVEBATCH_NUM_PROCESSES"
ENV_PROCESS_ID = "DIVEBATCH_PROCESS_ID"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
  """Starts ``jax.distributed`` (call once, before any other JAX call).

  Arguments default to the ``DIVEBATCH_COORDINATOR`` / ``DIVEBATCH_NUM_PROCESSES`` /
  ``DIVEBATCH_PROCESS_ID`` environment variables, then to JAX's own cluster
  detection.
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
  if num_processes is None and ENV_NUM_PROCESSES in os.environ:
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and ENV_PROCESS_ID in os.environ:
    process_id = int(os.environ[ENV_PROCESS_ID])
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )


def make_mesh(devices: str | int = "all") -> Mesh:
  """A 1-D mesh over ``"data"``: all global devices, or the first ``devices`` of them."""
  available = jax.devices()
  if devices == "all":
    chosen = available
  else:
    count = int(devices)
    if not 1 <= count <= len(available):
      raise ValueError(f"devices must be 'all' or an int in [1, {len(available)}], got {devices!r}.")
    if jax.process_count() > 1 and count != len(available):
      raise ValueError("with several processes use devices='all' (every process's devices).")
    chosen = available[:count]
  return Mesh(np.asarray(chosen), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """``(m, ...)`` micro-batches and ``(m,)`` masks: rows split over ``"data"``."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Parameters and optimizer state: a full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def replicate(tree, mesh: Mesh):
  """``tree`` placed replicated on ``mesh`` (works across processes)."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
  )
