"""ghost_sums: the loss re-evaluated with every tap in place, vmapped over the batch, and one
backward pass giving Σ loss, Σ g_i, ||g_i||² and <g_i, v>.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from divebatch_jax.stats import _jax_compat as compat
from divebatch_jax.stats.ghost.types import GhostPlan, LeafView, Path, PyTree, Tap
from divebatch_jax.stats.ghost.cost import _chunk_size
from divebatch_jax.stats.ghost.walker import _walk
from divebatch_jax.stats.ghost.rules import _masked
from divebatch_jax.stats.ghost.forms import EXAMPLE_AXIS, _tapped_layer
from divebatch_jax.stats.ghost.links import _inner_product_tap, _lookup_link, _product_link
from divebatch_jax.stats.ghost.plan import trace_plan


def _own_copy(real: jax.Array, x: jax.Array) -> jax.Array:
  """``x`` as this example's own value: under vmap batched even when ``x`` is a constant
  (position ids, a fixed input), so the layer's output and cotangent are per example
  rather than one for the batch with the cotangent summed over it (XLA folds the select)."""
  return jnp.where(real, x, x)


def _per_example_sums(per_example: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(||g_i||²)_i and Σ_i g_i from a leaf's per-example gradients (B, *shape), float32."""
  rows = per_example.astype(jnp.float32).reshape(per_example.shape[0], -1)
  return jnp.sum(rows**2, axis=1), jnp.sum(rows, axis=0).reshape(per_example.shape[1:])


class GhostSums(NamedTuple):
  """What :func:`ghost_sums` returns, over the real rows of one batch (float32).

  loss_sum: Σ_i loss_i; sum_g: Σ_i g_i, shaped like the parameters;
  sq_norms: (||g_i||²)_i, zero on padded rows; inner_products: (<g_i, d>)_i for
  the ``direction`` d given to :func:`ghost_sums`, or (<g_i, ḡ>)_i with
  ``about_mean`` (ḡ = sum_g / the real count), zero on padded rows; None without either.
  """

  loss_sum: jax.Array
  sum_g: PyTree
  sq_norms: jax.Array
  inner_products: jax.Array | None = None


def _with_chunks(plan: GhostPlan, batch: int, linked: bool) -> dict[Path, Tap]:
  """The plan's taps, product layers given their chunk of a loop over ``batch`` examples."""
  def chunked(tap):
    if tap.form != "product" or tap.kind == compat.GATHER:
      return tap
    size = math.prod(tap.eqn.invars[tap.kernel_pos].aval.shape)
    return tap._replace(chunk=_chunk_size(batch, size, plan.loop_blocks, linked))

  return {path: chunked(tap) for path, tap in plan.taps.items()}


def _example_loss(plan: GhostPlan, directions: list, with_ip: bool, batch: int):
  """The loss of one example re-evaluated from ``plan`` with every tap in place:
  ``(shared, copies, probes, ip_probes, example, real, count) -> loss``, to be vmapped
  (``count``, the batch's real rows, and ``shared`` leaves unbatched).

  ``with_ip``: each tapped kernel passes through :func:`_inner_product_tap` (a tied
  table's once, at its lookup, for both uses), whose ``ip_probes`` cotangent is <g_i, v>.
  """
  plan_taps = _with_chunks(plan, batch, with_ip)
  layers = {path: _tapped_layer(tap, plan.loop_blocks, with_ip) for path, tap in plan_taps.items()}
  # A tied lookup's cross term 2<g_lookup, g_product> has a probe of its own, at path + (-1,).
  tied = {t.tied_lookup[0]: t for t in plan_taps.values() if t.tied_lookup is not None}
  links = {path: _lookup_link(plan_taps[path]) for path in tied}
  links.update({path: _product_link(t, plan_taps[t.tied_lookup[0]]) for path, t in plan_taps.items() if t.tied_lookup})
  kernels_in = {
      path: _inner_product_tap(tap, tied.get(path)) for path, tap in plan_taps.items() if with_ip and not tap.tied_lookup
  }
  leaf_of = {v: LeafView(i, (), directions[i]) for i, v in enumerate(plan.jaxpr.jaxpr.invars[: len(directions)])}

  def one_example(shared, copies, probes, ip_probes, example, real, count):
    looked_up = {}  # a tied lookup's path -> (row ids, the link its product fills)
    tied_operands = {}  # a tied lookup's path -> its product's (kernel, link), with_ip

    def tap_layer(path, eqn, invals, leaf_at):
      tap = plan_taps.get(path)
      if tap is None:
        return None
      activation, kernel, link = _own_copy(real, invals[1 - tap.kernel_pos]), invals[tap.kernel_pos], None
      if path in kernels_in:
        ids = activation if tap.kind == compat.GATHER else None
        direction = leaf_at[tap.kernel_pos].direction
        kernels, ip_links = kernels_in[path](kernel, ids, direction, count, ip_probes[path], real)
        kernel, link = kernels[0], ip_links[0]
        if path in tied:
          tied_operands[path] = (kernels[1], ip_links[1])
      elif with_ip:  # a tied product: the table and link its lookup's identity laid out
        kernel, link = tied_operands[tap.tied_lookup[0]]
      out = layers[path](activation, kernel, probes[path], link, real)
      if path in tied:
        out, looked_up[path] = links[path](out, activation, probes[path + (-1,)], real)
      elif tap.tied_lookup is not None:
        out = links[path](out, activation, *looked_up[tap.tied_lookup[0]])
      return [out]

    args = [copies[i] if i in copies else x for i, x in enumerate(shared)] + list(example)
    (losses,) = _walk(plan.jaxpr.jaxpr, plan.jaxpr.consts, args, dict(leaf_of), (), tap_layer)
    return losses[0]

  return one_example


def _copied_leaf_sums(rows: jax.Array, direction: jax.Array | None, count: jax.Array | None):
  """(||g_i||²)_i, Σ_i g_i and (<g_i, v>)_i of a leaf with per-example gradients ``rows``
  (B, *shape), zero on padded rows: v = ``direction``, or ḡ = Σ_i g_i / ``count`` where a
  count is given; None without either."""
  sq_norms, sum_g = _per_example_sums(rows)
  v = direction if count is None else sum_g / jnp.maximum(count, 1.0)
  if v is None:
    return sq_norms, sum_g, None
  flat = rows.astype(jnp.float32).reshape(rows.shape[0], -1)
  return sq_norms, sum_g, flat @ jnp.ravel(v).astype(jnp.float32)


def ghost_sums(
    loss_fn, params: PyTree, batch: PyTree, mask: jax.Array, *, direction: PyTree | None = None,
    about_mean: bool = False,
) -> GhostSums:
  """Per-example squared gradient norms and the summed gradient in one backward pass.

  ``mask`` is a bool (B,) array; padded rows add nothing (their inputs are replaced
  by zeros first, so garbage there cannot reach a sum). Each tapped layer adds its
  examples' squared norms to a per-example probe during the backward pass, when its
  output cotangent is at hand, so no cotangent outlives its layer.

  The same pass gives <g_i, v> per example, v = a ``direction`` d (shaped like
  ``params``: the previous step's mean gradient, say) or, ``about_mean``, the
  batch's own mean ḡ over the real rows. Each tapped layer adds its term once its
  backward pass has formed the summed kernel gradient S (so ḡ = S / count there):
  <G_i, v> from the example gradient G_i (product form, C·F per example) or
  <Ȳ_i, layer(X_i, v)> (Gram form and lookups: one more forward product of the
  layer); a tied table adds both uses' terms about its whole ḡ at its lookup; leaves
  with per-example copies add <g_i, v> from their (B, ...) gradients.
  """
  if direction is not None and about_mean:
    raise ValueError("ghost_sums takes direction= (a given d) or about_mean=True (the batch's ḡ), not both.")
  plan = trace_plan(loss_fn, params, batch)
  leaves, treedef = jax.tree.flatten(params)
  with_ip = about_mean or direction is not None
  directions = [None] * len(leaves) if direction is None else [jnp.asarray(d, jnp.float32) for d in jax.tree.leaves(direction)]
  b = mask.shape[0]
  zeros = lambda: jnp.zeros((b,), jnp.float32)
  copies = {i: jnp.broadcast_to(leaves[i], (b, *jnp.shape(leaves[i]))) for i in plan.per_example_leaves}
  shared = [None if i in copies else x for i, x in enumerate(leaves)]
  cross = [t.tied_lookup[0] + (-1,) for t in plan.taps.values() if t.tied_lookup is not None]
  probes = {path: zeros() for path in [*plan.taps, *cross]}
  ip_probes = {path: zeros() for path, t in plan.taps.items() if with_ip and t.tied_lookup is None}
  example_leaves = [_masked(mask.reshape((b,) + (1,) * (x.ndim - 1)), x)[:, None] for x in jax.tree.leaves(batch)]
  count = jnp.sum(mask).astype(jnp.float32)
  one_example = jax.vmap(
      _example_loss(plan, directions, with_ip, b), in_axes=(None, 0, 0, 0, 0, 0, None), axis_name=EXAMPLE_AXIS
  )

  def masked_sum(shared, copies, probes, ip_probes):
    losses = one_example(shared, copies, probes, ip_probes, example_leaves, mask, count)
    return jnp.sum(jnp.where(mask, losses, 0.0)).astype(jnp.float32)

  loss_sum, (g_shared, g_copies, g_probes, g_ip) = jax.value_and_grad(masked_sum, argnums=(0, 1, 2, 3))(
      shared, copies, probes, ip_probes
  )
  sum_g = [None if g is None else g.astype(jnp.float32) for g in g_shared]
  sq_norms = sum(g_probes.values(), start=zeros())
  inner = sum(g_ip.values(), start=zeros()) if with_ip else None
  for i, g in g_copies.items():
    rows = _masked(mask.reshape((b,) + (1,) * (g.ndim - 1)), g)
    leaf_sq, sum_g[i], leaf_ip = _copied_leaf_sums(rows, directions[i], count if about_mean else None)
    sq_norms = sq_norms + leaf_sq
    inner = None if leaf_ip is None else inner + leaf_ip
  inner = None if inner is None else _masked(mask, inner)
  return GhostSums(loss_sum, treedef.unflatten(sum_g), _masked(mask, sq_norms), inner)

