"""The rule table keyed by primitive: which equations are tappable layers, their sizes for the
cost model, their blocks and kernel layout, and the helpers every form shares.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from divebatch_jax.stats import _jax_compat as compat
from divebatch_jax.stats.ghost.types import Blocks, LeafView, Tap
from divebatch_jax.stats.ghost.cost import _choose_form
from divebatch_jax.stats.ghost.walker import _bind
from divebatch_jax.stats.ghost.dot import _dot_blocks, _dot_kernel_blocks
from divebatch_jax.stats.ghost.conv import _conv_blocks, _conv_kernel_blocks
from divebatch_jax.stats.ghost.lookup import _is_row_lookup, _lookup_blocks


# The rule table of the product layers, keyed by primitive: the layer's per-example blocks
# over a batch, and its kernel laid out like them.
_BLOCKS = {compat.DOT: _dot_blocks, compat.CONV: _conv_blocks}
_KERNEL_BLOCKS = {compat.DOT: _dot_kernel_blocks, compat.CONV: _conv_kernel_blocks}


def _over_blocks(blocks: Blocks, fn, loop: bool) -> jax.Array:
  """Σ_k fn(X_k, Y_k): unrolled, or in a loop that holds one block at a time (XLA:CPU
  materialises every unrolled block at once). The loop starts from block 0's value: a
  start of zeros depends on nothing, and XLA may form it in the forward pass and keep
  it until the backward pass needs it."""
  first = fn(*blocks.pair(0))
  if not loop or blocks.count == 1:
    return sum((fn(*blocks.pair(k)) for k in range(1, blocks.count)), start=first)
  return lax.fori_loop(1, blocks.count, lambda k, acc: acc + fn(*blocks.pair(k)), first)


def _tappable(eqn, leaf_at: dict[int, LeafView]) -> int | None:
  """The operand position of the one leaf if ``eqn`` is a layer this module can tap."""
  if len(leaf_at) != 1:
    return None
  (pos,) = leaf_at
  name = compat.primitive_name(eqn)
  if name == compat.DOT:
    return pos
  if name == compat.CONV and pos == 1 and compat.param(eqn, "batch_group_count") == 1:
    return pos
  if name == compat.GATHER and pos == 0 and _is_row_lookup(eqn):
    return pos
  return None


def _make_tap(eqn, leaf_at: dict[int, LeafView], factor: float) -> Tap | None:
  pos = _tappable(eqn, leaf_at)
  if pos is None:
    return None
  kind = compat.primitive_name(eqn)
  kernel_size = math.prod(eqn.invars[pos].aval.shape)
  sizes = _sizes(eqn, pos, kernel_size)
  return Tap(kind, leaf_at[pos], pos, eqn, _choose_form(kind, sizes, kernel_size, factor), sizes)


def _sizes(eqn, pos: int, kernel_size: int) -> tuple[int, int, int]:
  """(T, C, F) per example of a product layer; (T, table entries, D) of a lookup."""
  kind = compat.primitive_name(eqn)
  act, out = eqn.invars[1 - pos].aval, eqn.outvars[0].aval
  batched = lambda aval: jax.ShapeDtypeStruct((1, *aval.shape), aval.dtype)
  if kind == compat.GATHER:
    ids, y = jax.eval_shape(lambda a, c: _lookup_blocks(eqn, pos, a, c), batched(act), batched(out))
    return ids.shape[1], kernel_size, y.shape[-1]

  count = []

  def shapes(a, c):
    blocks = _BLOCKS[kind](eqn, pos, a, c)
    count.append(blocks.count)
    return blocks.pair(0)

  x, y = jax.eval_shape(shapes, batched(act), batched(out))
  return y.shape[2], count[0] * x.shape[-1], y.shape[-1]


def _kernel_blocks(tap: Tap, kernel: jax.Array) -> jax.Array:
  """The kernel rearranged like the product form's per-example blocks, (K, G, C, F):
  K blocks (kernel offsets of a convolution, one for a dot product), G groups, C
  inputs and F outputs per group."""
  return _KERNEL_BLOCKS[tap.kind](tap, kernel)


def _layer(tap: Tap, activation: jax.Array, kernel: jax.Array) -> jax.Array:
  operands = [activation, kernel] if tap.kernel_pos == 1 else [kernel, activation]
  return _bind(tap.eqn, operands)[0]


def _transpose(fn, like: jax.Array, cotangent: jax.Array) -> jax.Array:
  """The transpose of the linear ``fn`` at ``cotangent`` (``like``: its input's shape and dtype)."""
  (out,) = jax.linear_transpose(fn, jax.ShapeDtypeStruct(jnp.shape(like), jnp.result_type(like)))(cotangent)
  return out


def _masked(real: jax.Array, x: jax.Array) -> jax.Array:
  return jnp.where(real, x, jnp.zeros((), x.dtype))


def _block_gradients(blocks: Blocks) -> list[jax.Array]:
  """Each block's per-example gradient G_k = X_kᵀ Y_k, (B, G, C, F) in float32."""
  f32 = dict(preferred_element_type=jnp.float32)
  gradients = []
  for k in range(blocks.count):
    x, y = blocks.pair(k)  # (B, G, T, C), (B, G, T, F)
    if x.shape[1] > 1:
      gradients.append(jnp.einsum("bgtc,bgtf->bgcf", x, y, **f32))
    else:  # one group: plain (C, F) products, whose layout XLA keeps through the sums
      gradients.append(jnp.einsum("btc,btf->bcf", x[:, 0], y[:, 0], **f32)[:, None])
  return gradients

