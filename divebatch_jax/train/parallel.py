"""Data parallelism on JAX's own SPMD machinery: a mesh, shardings, multi-host start-up.

Nothing here communicates by hand. Each micro-batch ``(m, ...)`` of a step is
sharded over the mesh's ``"data"`` axis along its rows (each device holds ``m / D``
rows, padded rows included, masked); parameters and optimizer state are
replicated. The jitted step is then partitioned by XLA: per-example
gradients are computed where their rows live, and every sum over the batch —
the mean gradient, ``count``, ``sum_g``, ``sum_sq``, ``sum_ip`` — becomes an
all-reduce, so the statistics are those of the *global* batch and equal the
single-device values for the same batch (up to float summation order).

Parameters can be sharded too, on a mesh of named axes (:func:`make_axes_mesh`,
the CLI's ``--mesh data=2,fsdp=4``): ``"data"`` and ``"fsdp"`` split every batch's
rows (FSDP is data parallel with sharded parameters), ``"fsdp"`` also splits the
parameters along their ``"embed"`` logical axis, and ``"model"`` splits them along
``"heads"`` and ``"mlp"`` (tensor parallelism), as the models' partitioning metadata
names them (:func:`param_shardings`). The step keeps every state leaf on its
parameter's sharding (:mod:`divebatch_jax.transform.placement`).

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

import math
import os
import warnings

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, MODEL_AXIS)
# Logical axis (the models' partitioning metadata) -> the mesh axis that splits it.
LOGICAL_RULES = {"embed": FSDP_AXIS, "heads": MODEL_AXIS, "mlp": MODEL_AXIS, "conv_out": MODEL_AXIS}
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


def parse_mesh(text: str) -> dict[str, int]:
  """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}`` (axes among :data:`MESH_AXES`)."""
  axes = {}
  for part in str(text).split(","):
    name, _, size = part.strip().partition("=")
    if name not in MESH_AXES or name in axes or not size.isdigit() or int(size) < 1:
      raise ValueError(
          f"--mesh must be comma-separated AXIS=SIZE with AXIS one of {MESH_AXES} (each once) "
          f"and SIZE an int >= 1, e.g. data=2,fsdp=4; got {text!r}."
      )
    axes[name] = int(size)
  return axes


def make_axes_mesh(axes: dict[str, int]) -> Mesh:
  """A mesh of the named ``axes`` (in :data:`MESH_AXES` order) over that many global
  devices; jax's automatic sharding propagation inside the step."""
  names = tuple(a for a in MESH_AXES if a in axes)
  count, available = math.prod(axes[a] for a in names), jax.devices()
  if count > len(available) or (jax.process_count() > 1 and count != len(available)):
    raise ValueError(f"--mesh {axes} needs {count} devices; {len(available)} are available "
                     "(with several processes the mesh must span them all).")
  devices = np.asarray(available[:count]).reshape([axes[a] for a in names])
  return Mesh(devices, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def run_mesh(mesh: str | None, devices: str | int) -> Mesh:
  """The run's mesh: ``mesh`` (``"data=2,fsdp=4"``, :func:`parse_mesh`) where given, else
  the 1-D data mesh over ``devices`` (:func:`make_mesh`)."""
  return make_mesh(devices) if mesh is None else make_axes_mesh(parse_mesh(mesh))


def describe_mesh(mesh: Mesh) -> str:
  """``"data=2,fsdp=4"``: the mesh as the run's records state it."""
  return ",".join(f"{name}={size}" for name, size in mesh.shape.items())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """``(m, ...)`` micro-batches and ``(m,)`` masks: rows split over ``"data"`` (and
  ``"fsdp"``, where the mesh has it)."""
  rows = tuple(a for a in (DATA_AXIS, FSDP_AXIS) if a in mesh.axis_names)
  return NamedSharding(mesh, PartitionSpec(rows[0] if len(rows) == 1 else rows))


def _spec(names, shape, mesh: Mesh, skipped: set) -> PartitionSpec:
  """The mesh axes for a parameter's logical ``names``: each through
  :data:`LOGICAL_RULES`, where the mesh has the axis (size > 1), it is not used twice and
  it divides the dimension (else that dimension stays whole, noted in ``skipped``)."""
  spec, used = [], set()
  for name, dim in zip(names or (), shape):
    axis = LOGICAL_RULES.get(name)
    size = mesh.shape.get(axis, 1)
    if size > 1 and axis not in used and dim % size == 0:
      spec.append(axis)
      used.add(axis)
    else:
      if size > 1:
        skipped.add(f"{name} ({dim} rows over {axis}={size})")
      spec.append(None)
  return PartitionSpec(*spec)


def param_shardings(params, mesh: Mesh):
  """The sharding of every parameter of an nnx ``State``: its logical axis names
  (``out_sharding`` metadata, :func:`flax.nnx.with_partitioning`) mapped onto ``mesh``
  by :data:`LOGICAL_RULES`; parameters without names are replicated. A dimension the
  mesh axis does not divide stays whole (a warning says so once)."""
  from flax import nnx  # the shell's models are nnx; the library does not need flax here

  skipped: set = set()

  def one(x):
    if isinstance(x, nnx.Variable):
      return x.replace(NamedSharding(mesh, _spec(x.get_metadata().get("out_sharding"), np.shape(x), mesh, skipped)))
    return NamedSharding(mesh, PartitionSpec())

  shardings = jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  if skipped:
    warnings.warn(f"kept whole (the mesh axis does not divide them): {', '.join(sorted(skipped))}.", stacklevel=2)
  return shardings


def place_params(params, mesh: Mesh):
  """``params`` (an nnx ``State``) on ``mesh`` as :func:`param_shardings` lays them out."""
  return shard(params, param_shardings(params, mesh))


def place_like(tree, reference, mesh: Mesh):
  """``tree`` on the shardings of ``reference``'s leaves (same structure); leaves of
  ``reference`` that are not on ``mesh``'s devices, replicated."""
  everywhere = set(mesh.devices.flat)
  sharding = lambda r: r.sharding if set(getattr(getattr(r, "sharding", None), "device_set", ())) == everywhere else replicated(mesh)
  return shard(tree, jax.tree.map(sharding, reference))


def shard(tree, shardings):
  """``tree`` placed on ``shardings`` (a tree of them; works across processes)."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index: np.asarray(x)[index]), tree, shardings
  )


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
