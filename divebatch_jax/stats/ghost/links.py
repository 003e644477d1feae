"""Inner products <g_i, v> from the same backward pass, and the links of a tied table (a lookup
and a product reading the same leaf).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from divebatch_jax.stats import _jax_compat as compat
from divebatch_jax.stats.ghost.types import Tap
from divebatch_jax.stats.ghost.walker import _bind
from divebatch_jax.stats.ghost.dot import _dot_blocks
from divebatch_jax.stats.ghost.lookup import _lookup_operands
from divebatch_jax.stats.ghost.rules import _layer, _masked, _transpose


def _link_zeros(tap: Tap, real: jax.Array):
  """Zeros of this example shaped like what the tap's backward pass returns as its link's
  cotangent: the kernel gradient, Ȳ (a lookup's Gram form) or (Ȳ, X) (:meth:`Tap.links_rows`)."""
  zeros = lambda var: jnp.broadcast_to(jnp.where(real, 0, 0).astype(var.aval.dtype), var.aval.shape)
  if not tap.links_rows():
    return zeros(tap.eqn.invars[tap.kernel_pos])
  if tap.kind == compat.GATHER:
    return zeros(tap.eqn.outvars[0])
  return zeros(tap.eqn.outvars[0]), zeros(tap.eqn.invars[1 - tap.kernel_pos])


def _inner_product(tap: Tap, link, ids: jax.Array | None, v: jax.Array) -> jax.Array:
  """<g_i, v> of one example (v laid out like the kernel operand) from its link: <G_i, v>
  from the example gradient G_i (C·F work), else <Ȳ_i, layer(X_i, v)>, the layer's
  forward product with v as its kernel (a lookup's X_i: its ``ids``; :meth:`Tap.links_rows`)."""
  f32 = jnp.float32
  if not tap.links_rows():
    return jnp.sum(link.astype(f32) * v.astype(f32))
  y_bar, x = (link, ids) if tap.kind == compat.GATHER else link
  return jnp.sum(y_bar.astype(f32) * _layer(tap, x, v.astype(y_bar.dtype)).astype(f32))


def _as_read_by(product: Tap, table: jax.Array) -> jax.Array:
  """A tied table (as its lookup reads it: the leaf itself) laid out and cast as ``product``
  reads it, through the reshapes and transposes of its :class:`LeafView`."""
  for eqn in product.kernel.layout:
    table = _bind(eqn, [table])[0]
  return table.astype(product.eqn.invars[product.kernel_pos].aval.dtype)


def _inner_product_tap(tap: Tap, tied: Tap | None):
  """The identity on a tapped layer's kernel operand, returning ``(kernels, links)``:
  zeros that the tap's backward pass fills with what it has at hand (:func:`_link_zeros`).

  Its backward pass runs after the layer's. The kernel's cotangent S is then
  Σ_{real i} g_i of this use: JAX sums the cotangent of an operand that is not batched
  over the vmapped batch (the ordinary weight gradient, no extra work). It returns
  <g_i, v> (:func:`_inner_product`) as ``ip_probe``'s cotangent, v the given ``direction``
  or ḡ = S / ``count``. ``tied``: the product reading the same table after this lookup;
  its kernel (the table laid out as it reads it) and link are outputs here too, so S is
  the table's whole Σ_i g_i, both uses' terms of <g_i, ḡ> are added here, and the
  product's cotangent is passed on to the table.
  """
  uses = (tap,) if tied is None else (tap, tied)

  @jax.custom_vjp
  def kernel_in(kernel, ids, direction, count, ip_probe, real):
    del ids, direction, count, ip_probe
    kernels = (kernel,) if tied is None else (kernel, _as_read_by(tied, kernel))
    return kernels, tuple(_link_zeros(t, real) for t in uses)

  def forward(kernel, ids, direction, count, ip_probe, real):
    return kernel_in(kernel, ids, direction, count, ip_probe, real), (kernel, ids, direction, count, real)

  def backward(residuals, cotangents):
    kernel, ids, direction, count, real = residuals
    kernel_bars, links = cotangents
    total = kernel_bars[0]
    if tied is not None:
      total = total + _transpose(lambda k: _as_read_by(tied, k), kernel, kernel_bars[1])
    v = total.astype(jnp.float32) / jnp.maximum(count, 1.0) if direction is None else direction
    vs = (v,) if tied is None else (v, _as_read_by(tied, v))
    ip = sum(_inner_product(t, link, ids, w) for t, link, w in zip(uses, links, vs))
    return total, None, None, None, _masked(real, ip), None

  kernel_in.defvjp(forward, backward)
  return kernel_in


def _lookup_link(lookup: Tap):
  """The identity on a tied lookup's rows, which also returns a zero ``link`` (T, D)
  for the later product on the same table. The product's backward pass sets the
  link's cotangent to M = the rows of its example gradient at the looked-up ids, so
  this backward pass adds the cross term 2<g_lookup, g_product> = 2 Σ_t <ȳ_t, M_t>
  to its probe. Returns ``(rows, (ids, link))``."""

  @jax.custom_vjp
  def link(rows, indices, probe, real):
    del probe
    ids, y = _lookup_operands(lookup.eqn, 0, indices, rows)
    # Zeros of this example (batched under vmap): an unbatched output's cotangent
    # would arrive summed over the batch.
    return rows, (ids, jnp.broadcast_to(jnp.where(real, 0.0, 0.0), y.shape))

  def forward(rows, indices, probe, real):
    return link(rows, indices, probe, real), (indices, real)

  def backward(residuals, cotangents):
    indices, real = residuals
    y_bar, (_, m) = cotangents
    ids, y = _lookup_operands(lookup.eqn, 0, indices, y_bar)
    read = (ids < lookup.eqn.invars[0].aval.shape[0])[:, None]  # FILL_OR_DROP reads nothing
    cross = 2.0 * jnp.sum(jnp.where(read, m * y.astype(jnp.float32), 0.0))
    return y_bar, None, _masked(real, cross), None

  link.defvjp(forward, backward)
  return link


def _product_link(product: Tap, lookup: Tap):
  """The identity on a tied product's output that fills the lookup's link (see
  :func:`_lookup_link`) with M_t = (X_iᵀ Ȳ_i)[id_t]: Ȳ's columns (or X's) at the T
  looked-up ids times the other operand, T·T_ids·D work, no copy of the table."""
  rows_on = product.tied_lookup[1]
  num_rows = lookup.eqn.invars[0].aval.shape[0]
  f32 = dict(preferred_element_type=jnp.float32)

  @jax.custom_vjp
  def link(output, activation, ids, link_in):
    del activation, ids, link_in
    return output

  def forward(output, activation, ids, link_in):
    return output, (activation, ids)

  def backward(residuals, y_bar):
    activation, ids = residuals
    blocks = _dot_blocks(product.eqn, product.kernel_pos, activation[None], y_bar[None])
    x, y = (side[0, 0] for side in blocks.pair(0))  # (T, C), (T, F)
    at = jnp.clip(ids, 0, num_rows - 1)
    if rows_on == "F":
      m = jnp.einsum("ts,tc->sc", y[:, at], x, **f32)
    else:
      m = jnp.einsum("ts,tf->sf", x[:, at], y, **f32)
    return y_bar, None, None, m

  link.defvjp(forward, backward)
  return link

