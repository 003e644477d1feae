"""trace_plan: trace the loss of one example, record every equation reading a leaf, and decide
how each leaf is covered.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp

from divebatch_jax.stats import _jax_compat as compat
from divebatch_jax.stats.ghost.types import GhostPlan, LeafView, Path, PyTree, Tap
from divebatch_jax.stats.ghost.cost import gram_factor
from divebatch_jax.stats.ghost.walker import _bind, _trace_scope, _walk
from divebatch_jax.stats.ghost.rules import _kernel_blocks, _make_tap


# Primitives through which a leaf enters the computation elementwise: its per-example
# gradient is a (B, *leaf shape) array from the broadcast copies, cheap for small leaves.
_ELEMENTWISE = compat.ELEMENTWISE


def _taps_of_uses(uses, leaf_shape, factor: float, jaxpr: compat.Jaxpr) -> dict[Path, Tap] | None:
  """The taps covering one leaf from its uses ``[(path, eqn, leaf_at)]`` in trace order,
  or None (per-example copies): one tappable use, or a row lookup followed by one
  product on the same table (a tied embedding and output head) inside the same
  checkpoint and scan body."""
  made = [(path, _make_tap(eqn, leaf_at, factor)) for path, eqn, leaf_at in uses]
  if any(tap is None for _, tap in made) or len(made) > 2:
    return None
  if len({_trace_scope(jaxpr, path) for path, _ in made}) > 1:
    return None
  if len(made) == 1:
    return dict(made)
  (lookup_path, lookup), (product_path, product) = made
  # The lookup must read the table itself (no transpose on the way), so that its rows are
  # the table's: _table_rows_axis finds them in the product's kernel.
  rows_on = _table_rows_axis(product, leaf_shape) if lookup.kind == compat.GATHER and not lookup.kernel.layout else None
  if rows_on is None or product.kind != compat.DOT:
    return None
  return {lookup_path: lookup, product_path: product._replace(tied_lookup=(lookup_path, rows_on))}


def _table_rows_axis(tap: Tap, table_shape: tuple[int, ...]) -> str | None:
  """Which axis of a dot product's kernel blocks (1, 1, C, F) runs over the rows of
  the (rows, D) table it reads ("F": ``h @ E.T``, "C": ``x @ E``), the other over
  its D columns in order; None when the kernel is laid out otherwise."""
  if tap.kind != compat.DOT or len(table_shape) != 2:
    return None
  with jax.ensure_compile_time_eval():
    row, col = (jnp.broadcast_to(jnp.arange(n).reshape(shape), table_shape)
                for n, shape in ((table_shape[0], (-1, 1)), (table_shape[1], (1, -1))))
    for eqn in tap.kernel.layout:
      row, col = _bind(eqn, [row])[0], _bind(eqn, [col])[0]
    row, col = _kernel_blocks(tap, row), _kernel_blocks(tap, col)
    if row.shape[:2] != (1, 1):
      return None
    c, f = jnp.arange(row.shape[2])[:, None], jnp.arange(row.shape[3])[None, :]
    if bool(jnp.all(row[0, 0] == f) & jnp.all(col[0, 0] == c)):
      return "F"
    if bool(jnp.all(row[0, 0] == c) & jnp.all(col[0, 0] == f)):
      return "C"
  return None


def _example_spec(batch: PyTree) -> list[jax.ShapeDtypeStruct]:
  return [jax.ShapeDtypeStruct((1, *jnp.shape(x)[1:]), jnp.result_type(x)) for x in jax.tree.leaves(batch)]


def trace_plan(loss_fn, params: PyTree, batch: PyTree, *, backend: str | None = None) -> GhostPlan:
  """Traces ``loss_fn`` on one example of ``batch`` and decides how to cover each leaf.

  A leaf is tapped when it is read by exactly one equation and that equation is a
  ``dot_general`` (either operand the leaf, the other not a leaf), a
  ``conv_general_dilated`` with the leaf as kernel and ``batch_group_count == 1``,
  or a row ``gather`` from the leaf as table; its form follows the cost model for
  ``backend`` (default: JAX's default backend). Unread leaves need nothing; every
  other leaf gets per-example gradients from broadcast copies ("elementwise" when
  only elementwise arithmetic reads it).
  """
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = [leaf for _, leaf in leaves_with_paths]
  batch_treedef = jax.tree.structure(batch)

  def one_example(leaf_values, example_leaves):
    losses = loss_fn(treedef.unflatten(leaf_values), batch_treedef.unflatten(example_leaves))
    if jnp.shape(losses) != (1,):
      raise ValueError(
          f"loss_fn must return per-example losses of shape (B,); on one example it returned "
          f"shape {jnp.shape(losses)}."
      )
    return losses

  leaf_spec = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves]
  closed = jax.make_jaxpr(one_example)(leaf_spec, _example_spec(batch))
  reads: dict[int, list[tuple[Path, compat.JaxprEqn, dict[int, int]]]] = {}

  def record(path, eqn, invals, leaf_at):
    for view in leaf_at.values():
      reads.setdefault(view.leaf, []).append((path, eqn, leaf_at))

  def walk_all(*args):
    leaf_of = {v: LeafView(i) for i, v in enumerate(closed.jaxpr.invars[: len(leaves)])}
    return _walk(closed.jaxpr, closed.consts, args, leaf_of, (), record)

  jax.eval_shape(walk_all, *closed.in_avals)
  backend = backend or jax.default_backend()
  factor = gram_factor(backend)
  taps, per_example, elementwise = {}, [], []
  for leaf, uses in sorted(reads.items()):
    leaf_taps = _taps_of_uses(uses, jnp.shape(leaves[leaf]), factor, closed.jaxpr)
    if leaf_taps is None:
      per_example.append(leaf)
      if all(compat.primitive_name(use) in _ELEMENTWISE for _, use, _ in uses):
        elementwise.append(leaf)
    else:
      taps.update(leaf_taps)
  names = tuple(jax.tree_util.keystr(p) for p, _ in leaves_with_paths)
  sizes = tuple(math.prod(jnp.shape(x)) for x in leaves)
  opaque = _opaque_reads({leaf: reads[leaf] for leaf in per_example}, names)
  return GhostPlan(
      closed, taps, tuple(per_example), tuple(elementwise), names, sizes, factor, backend == "cpu", opaque
  )


_WARNED_PRIMITIVES: set[str] = set()


def _opaque_reads(fallback_uses: dict, names: tuple[str, ...]) -> tuple[tuple[int, tuple[str, ...]], ...]:
  """``(leaf, primitive names)`` of the fallback leaves read by a higher-order primitive
  the walker does not know, with a warning once per primitive (per process): such a
  leaf's norm is exact but costs B copies of it, and a new primitive may be one the
  taps should learn."""
  known = compat.CALL_PRIMITIVES | compat.CHECKPOINT_PRIMITIVES | {compat.SCAN}
  opaque = []
  for leaf, uses in sorted(fallback_uses.items()):
    primitives = sorted({compat.primitive_name(e) for _, e, _ in uses if compat.primitive_name(e) not in known and compat.is_higher_order(e)})
    if primitives:
      opaque.append((leaf, tuple(primitives)))
  for primitive in sorted({p for _, ps in opaque for p in ps} - _WARNED_PRIMITIVES):
    _WARNED_PRIMITIVES.add(primitive)
    leaves = [names[leaf] for leaf, ps in opaque if primitive in ps]
    warnings.warn(
        f"divebatch_jax.stats.taps: parameter leaves {', '.join(leaves)} enter {primitive!r}, a higher-order "
        f"primitive the taps do not walk; their per-example norms come from per-example copies (exact, "
        f"B copies of each leaf: 'per-example fallback' in GhostPlan.describe()). Said once per primitive.",
        stacklevel=3,
    )
  return tuple(opaque)

