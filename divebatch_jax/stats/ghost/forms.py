"""The forms of a tapped layer's backward pass: the product form over the whole batch
(``custom_vmap`` + ``custom_vjp``), the product form of a lookup, and the Gram form (an
identity with a custom backward pass).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax

from divebatch_jax.stats import _jax_compat as compat
from divebatch_jax.stats.ghost.types import Tap
from divebatch_jax.stats.ghost.lookup import _lookup_blocks, _lookup_gram_sq_norms
from divebatch_jax.stats.ghost.rules import _BLOCKS, _block_gradients, _kernel_blocks, _layer, _masked, _over_blocks, _transpose


# The name of ghost_sums' vmapped example axis: a product-form lookup's backward pass sums
# its table gradient over the batch with lax.psum over it.
EXAMPLE_AXIS = "divebatch_examples"


def _product_tap(tap: Tap, linked: bool):
  """A product layer (``dot_general``, convolution) whose backward pass runs over the batch.

  Vmapped over the examples (:func:`jax.custom_batching.custom_vmap`), the layer is
  applied to the whole batch by a function whose backward pass has the batch's inputs
  X and output cotangents Ȳ at hand. Block k of example i's kernel gradient,
  G_ik = X_ikᵀ Ȳ_ik, adds ||G_ik||² to the example's norm (the probe's cotangent); the
  blocks' sum over the batch is the kernel's cotangent -- the ordinary weight gradient,
  nothing computed twice -- and, ``linked`` (for :func:`_inner_product_tap`), each
  example's whole gradient is the link's cotangent, or its (Ȳ_i, X_i) where the layer
  loops over the batch.

  ``tap.chunk`` (XLA:CPU, large per-example gradients: :func:`_chunk_size`): the
  gradients are formed that many examples at a time in a loop and squared and summed
  while in cache, rather than B·C·F floats written to memory and read back twice (a
  D = 256 MLP block at T = 64 / 128: 1.57× / 1.31× a plain step in one pass, 0.94× / 0.91×
  in chunks: results/sequence_forms_cpu.md). A padded row (``real`` False) has zero
  inputs and a zero loss cotangent, so its gradient adds nothing; its norm and input
  cotangent are zeroed besides.
  """
  inexact = jnp.issubdtype(tap.eqn.invars[1 - tap.kernel_pos].aval.dtype, jnp.inexact)

  def layers(activations, kernel):
    return jax.vmap(lambda a: _layer(tap, a, kernel))(activations)

  def as_kernel(kernel, blocks_kgcf):
    return _transpose(lambda k: _kernel_blocks(tap, k).astype(jnp.float32), kernel, blocks_kgcf)

  @jax.custom_vjp
  def batch_layer(activations, kernel, probes, links, reals):
    del probes, links, reals
    return layers(activations, kernel)

  def forward(activations, kernel, probes, links, reals):
    return batch_layer(activations, kernel, probes, links, reals), (activations, kernel, reals)

  def backward(residuals, y_bars):
    activations, kernel, reals = residuals
    real = lambda z: _masked(reals.reshape((-1,) + (1,) * (z.ndim - 1)), z)
    a_bars = real(_transpose(lambda a: layers(a, kernel), activations, y_bars)) if inexact else None
    link = None
    if tap.chunk is None:
      gs = _example_gradients(tap, activations, y_bars)
      sums, sq_norms = _sums_and_norms(gs)
      if linked:
        link = jax.vmap(lambda *blocks: as_kernel(kernel, jnp.stack(blocks)))(*gs)
    else:
      sums, sq_norms = _in_chunks(tap, activations, y_bars)
      if linked:
        link = (real(y_bars), activations)
    return a_bars, as_kernel(kernel, jnp.stack(sums)), real(sq_norms), link, None

  batch_layer.defvjp(forward, backward)
  return _over_the_batch(batch_layer)


def _example_gradients(tap: Tap, activations, y_bars) -> list[jax.Array]:
  """Each block's (B, G, C, F) example gradients of a product layer."""
  return _block_gradients(_BLOCKS[tap.kind](tap.eqn, tap.kernel_pos, activations, y_bars))


def _sums_and_norms(gs):
  """The blocks' sums over the batch and each example's squared norm."""
  return [g.sum(0) for g in gs], sum(jnp.sum(g * g, axis=(1, 2, 3)) for g in gs)


def _in_chunks(tap: Tap, activations, y_bars):
  """:func:`_sums_and_norms` formed ``tap.chunk`` examples at a time in a loop."""
  chunk, batch = tap.chunk, activations.shape[0]
  count = -(-batch // chunk)
  # Zero rows pad the last chunk: their gradients are zero and add nothing.
  pad = lambda z: jnp.pad(z, [(0, count * chunk - batch)] + [(0, 0)] * (z.ndim - 1))
  xs, ys = pad(activations), pad(y_bars)
  at = lambda i: [lax.dynamic_slice_in_dim(z, i * chunk, chunk) for z in (xs, ys)]
  # The loop starts from chunk 0's sums (a start of zeros could be formed early and kept).
  sums, sq = _sums_and_norms(_example_gradients(tap, *at(0)))
  sq_norms = jnp.zeros((count, chunk), jnp.float32).at[0].set(sq)

  def body(i, carry):
    sums, sq_norms = carry
    more, sq = _sums_and_norms(_example_gradients(tap, *at(i)))
    return [s + m for s, m in zip(sums, more)], sq_norms.at[i].set(sq)

  sums, sq_norms = lax.fori_loop(1, count, body, (sums, sq_norms))
  return sums, sq_norms.reshape(-1)[:batch]


def _over_the_batch(batch_layer):
  """``(activation, kernel, probe, link, real) -> output`` of one example that, vmapped
  over the examples, calls ``batch_layer`` once on the whole batch (kernel shared)."""

  @compat.custom_vmap
  def layer(activation, kernel, probe, link, real):
    one = lambda tree: jax.tree.map(lambda z: z[None], tree)
    return batch_layer(one(activation), kernel, one(probe), one(link), one(real))[0]

  @layer.def_vmap
  def over_examples(axis_size, in_batched, activation, kernel, probe, link, real):
    if any(jax.tree.leaves(in_batched[1])):
      raise NotImplementedError("a tapped layer's kernel must be the same for every example")
    spread = lambda z, batched: z if batched else jnp.broadcast_to(z, (axis_size, *jnp.shape(z)))
    args = [jax.tree.map(spread, tree, batched) for tree, batched in zip((activation, probe, link, real), (in_batched[0], *in_batched[2:]))]
    return batch_layer(args[0], kernel, *args[1:]), True

  return layer


def _table_tap(tap: Tap, linked: bool):
  """A lookup of one example in the product form: its output cotangent's rows scattered
  into a table are the example's gradient (its squared norm is the probe's cotangent;
  the table itself the link's, ``linked``), summed over the batch inside the backward
  pass by a sum over the vmapped axis (:data:`EXAMPLE_AXIS`) into the kernel's
  cotangent, the ordinary table gradient. A padded row's rows are zero (zero loss
  cotangent); its norm is zeroed besides."""

  @jax.custom_vjp
  def lookup(indices, table, probe, link, real):
    del probe, link, real
    return _layer(tap, indices, table)

  def forward(indices, table, probe, link, real):
    return lookup(indices, table, probe, link, real), (indices, table, real)

  def backward(residuals, y_bar):
    indices, table, real = residuals
    t_bar = _transpose(lambda t: _layer(tap, indices, t), table, y_bar)
    rows = t_bar.astype(jnp.float32)
    t_sum = lax.psum(rows, EXAMPLE_AXIS).astype(jnp.result_type(table))
    return None, t_sum, _masked(real, jnp.sum(jnp.square(rows))), t_bar if linked else None, None

  lookup.defvjp(forward, backward)
  return lookup


def _norm_tap(tap: Tap, loop: bool, linked: bool):
  """The identity on a layer's output with a custom backward pass: it passes the output
  cotangent Ȳ on to the layer's ordinary backward pass and returns the example's
  squared kernel-gradient norm from Gram matrices as the probe's cotangent:
  <Σ_k X_k X_kᵀ, Ȳ Ȳᵀ> for a product layer, Σ_{t,s} [id_t = id_s] <ȳ_t, ȳ_s> for a
  lookup; and, ``linked``, Ȳ (a product layer: (Ȳ, X)) as the link's (for
  :func:`_inner_product_tap`). A padded row (``real`` False) has zero inputs and a zero
  loss cotangent, so its Ȳ is zero; its norm is zeroed besides. Ȳ itself passes
  unmasked, as in the product form: a select on it would be one more pass over every
  tapped layer's output cotangent (XLA does not fuse it into the dots that read Ȳ:
  with every layer in the Gram form, 1.25× → 1.19× a plain step's bytes on the GPTs of
  ``benchmarks/stats_overhead.py``, d = 128 and 256, B = 64)."""

  @jax.custom_vjp
  def identity(output, activation, probe, link, real):
    del activation, probe, link, real
    return output

  def forward(output, activation, probe, link, real):
    return output, (activation, real)

  def backward(residuals, y_bar):
    activation, real = residuals
    f32 = dict(preferred_element_type=jnp.float32)
    if tap.kind == compat.GATHER:
      ids, y = _lookup_blocks(tap.eqn, tap.kernel_pos, activation[None], y_bar[None])
      sq_norm = _lookup_gram_sq_norms(tap.eqn.invars[0].aval.shape[0], ids, y)[0]
    else:
      # ||g_i||² = Σ_k <X_k X_kᵀ, Y_k Y_kᵀ>, one side the same in every block.
      blocks = _BLOCKS[tap.kind](tap.eqn, tap.kernel_pos, activation[None], y_bar[None])
      gram = lambda z: jnp.einsum("bgtc,bgsc->bgts", z, z, **f32)
      side = 0 if blocks.fixed == "x" else 1
      varying = _over_blocks(blocks, lambda *pair: gram(pair[1 - side]), loop)
      sq_norm = jnp.sum(varying * gram(blocks.pair(0)[side]))
    link = None
    if linked:
      link = y_bar if tap.kind == compat.GATHER else (y_bar, activation)
    return y_bar, None, _masked(real, sq_norm), link, None

  identity.defvjp(forward, backward)
  return identity


def _tapped_layer(tap: Tap, loop: bool, linked: bool):
  """``(activation, kernel, probe, link, real) -> output`` of one example's equation, with
  the tap's backward pass (``linked``: it fills ``link`` for :func:`_inner_product_tap`)."""
  if tap.form == "product":
    return _table_tap(tap, linked) if tap.kind == compat.GATHER else _product_tap(tap, linked)
  norm = _norm_tap(tap, loop, linked)
  return lambda activation, kernel, *rest: norm(_layer(tap, activation, kernel), activation, *rest)

