"""Where a training state's leaves live: on the sharding of the parameter they belong to.

Given parameters placed on several devices (any ``NamedSharding``: replicated, FSDP,
tensor parallel, a 2-D mesh), :class:`Placement` says where every other leaf of the
state goes:

* a leaf derived from a parameter -- the inner optimizer's moments, the rule's
  parameter-shaped sums (``sum_g``), the step's gradient sums -- on that parameter's
  sharding. "Derived from" is read from the tree: the leaf's path ends with the
  parameter's path (``.../mu/blocks/qkv/kernel`` ends with ``blocks/qkv/kernel``) and
  its shape is the parameter's;
* every other leaf (counters, scalars, the policy's small state) replicated on the
  parameters' mesh.

The rule is structural, so it needs nothing from the transformation: optax's states,
:func:`~divebatch_jax.adaptive_batch`'s and the policies' all hold their
parameter-shaped leaves under the parameters' own tree. :class:`TrainStep
<divebatch_jax.transform.TrainStep>` uses it to initialise the state where it belongs
(compiled, so a large model's zeros are never formed on one device) and to pin every
step's outputs to the shardings its inputs had.

Example (4 simulated devices; a kernel sharded over ``"fsdp"``)::

    mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    params = {"w": jax.device_put(jnp.ones((8, 2)), NamedSharding(mesh, P("fsdp")))}
    place = Placement.of(params)
    place.shardings(optax.adam(1e-3).init(params))   # mu/w, nu/w on P('fsdp'); count on P()
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

PyTree = Any
_CACHE: dict = {}  # Placement by (structure, shardings, shapes) of the parameters
_CACHE_SIZE = 8


def _sharding_of(x) -> Sharding | None:
  return getattr(x, "sharding", None)


def _devices(sharding: Sharding | None) -> frozenset:
  return frozenset() if sharding is None else frozenset(sharding.device_set)


class Placement:
  """The shardings of a state's leaves, derived from the parameters' (see the module doc).

  Build it with :meth:`of`, which returns None where the parameters do not span several
  devices (a single device or host arrays: nothing to place, jax's defaults hold).
  """

  def __init__(self, params: PyTree):
    leaves = jax.tree_util.tree_leaves_with_path(params)
    self._by_path = {tuple(path): (tuple(np.shape(x)), _sharding_of(x)) for path, x in leaves}
    shardings = [s for _, (_, s) in self._by_path.items() if s is not None]
    self.devices = frozenset().union(*map(_devices, shardings)) if shardings else frozenset()
    named = [s for s in shardings if isinstance(s, NamedSharding)]
    mesh = named[0].mesh if named else Mesh(np.asarray(sorted(self.devices, key=lambda d: d.id)), ("devices",))
    self.replicated = NamedSharding(mesh, PartitionSpec())

  @classmethod
  def of(cls, params: PyTree) -> "Placement | None":
    """The placement for ``params`` (arrays or ``jax.ShapeDtypeStruct`` with shardings),
    or None when they do not span several devices. Kept for the next call with the same
    structure and shardings (a step asks once per call)."""
    leaves, structure = jax.tree.flatten(params)
    shardings = tuple(_sharding_of(x) for x in leaves)
    if all(s is None or s.num_devices == 1 for s in shardings) and len(set().union(*map(_devices, shardings))) <= 1:
      return None
    key = (structure, shardings, tuple(np.shape(x) for x in leaves))
    found = _CACHE.get(key)
    if found is None:
      if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE), None), None)
      found = _CACHE[key] = cls(params)
    return found

  def sharding_for(self, path: tuple, shape: tuple) -> Sharding:
    """The sharding of a state leaf at ``path`` with ``shape``: the parameter's whose path
    ends ``path`` (longest match first) and whose shape is ``shape``; else replicated."""
    for start in range(len(path) + 1):
      found = self._by_path.get(tuple(path[start:]))
      if found is not None and found[0] == tuple(shape) and found[1] is not None:
        return found[1]
    return self.replicated

  def shardings(self, tree: PyTree) -> PyTree:
    """Derived shardings for every leaf of ``tree`` (arrays or shapes)."""
    return jax.tree_util.tree_map_with_path(lambda path, x: self.sharding_for(path, np.shape(x)), tree)

  def kept(self, tree: PyTree, derive: bool = True) -> PyTree:
    """The shardings ``tree``'s leaves already have where they lie on the parameters'
    devices (the user's or a previous step's choice); elsewhere the derived one
    (``derive``: a state's leaves) or replicated (a batch's, a scalar argument's)."""

    def keep(path, x):
      own = _sharding_of(x)
      if own is not None and _devices(own) == self.devices:
        return own
      return self.sharding_for(path, np.shape(x)) if derive else self.replicated

    return jax.tree_util.tree_map_with_path(keep, tree)

  def place(self, tree: PyTree, derive: bool = True) -> PyTree:
    """``tree`` with every leaf on :meth:`kept`'s sharding: arrays elsewhere (a Python
    float set as a learning rate, a constant on one device) are moved; shapes get the
    sharding attached."""
    if all(_devices(_sharding_of(x)) == self.devices for x in jax.tree.leaves(tree)):
      return tree  # the usual case, a step's own outputs: nothing to look up
    return jax.tree.map(_put, tree, self.kept(tree, derive))


def placed(params: PyTree, state_like: tuple, others: tuple = ()) -> tuple:
  """``(placement, state_like, others)`` with every leaf on the mesh of ``params``:
  ``state_like`` trees (a state, gradient sums, model state) where :class:`Placement`
  puts them, ``others`` (batches, masks, scalars) as they are or replicated.
  ``placement`` is None, and nothing moves, where ``params`` do not span several devices."""
  placement = Placement.of(params)
  if placement is None:
    return None, state_like, others
  return placement, tuple(map(placement.place, state_like)), tuple(placement.place(t, derive=False) for t in others)


def _put(x, sharding: Sharding):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x if x.sharding == sharding else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if jax.process_count() == 1 or sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  value = np.asarray(x)  # several processes: each supplies its own devices' pieces
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
