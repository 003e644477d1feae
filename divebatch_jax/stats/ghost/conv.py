"""``conv_general_dilated`` layers: one block per kernel offset (strided views, never an
unfolded copy) and the kernel laid out like them.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from jax import lax

from divebatch_jax.stats import _jax_compat as compat
from divebatch_jax.stats.ghost.types import Blocks, Tap


def _conv_blocks(eqn, kernel_pos, activations, cotangents) -> Blocks:
  """One block per kernel offset (strided views, never an unfolded copy), as (B, G, T, ·).

  One side is the same in every block and the other is shifted by the offset: with
  unit strides and no input dilation, the side with fewer channels per group (the
  output cotangent on a tie: shifted, it derives from the backward pass only), so a
  block copies the narrower operand; otherwise the input, whose strided view of the
  padded input offset k meets is block k.
  """
  del kernel_pos  # always the rhs
  prm = compat.params(eqn)
  lhs_spec, rhs_spec, out_spec = prm["dimension_numbers"]
  groups = prm["feature_group_count"]
  window = [eqn.invars[1].aval.shape[d] for d in rhs_spec[2:]]
  x = activations.transpose(0, 1 + lhs_spec[0], *(1 + d for d in lhs_spec[2:]), 1 + lhs_spec[1])
  y = cotangents.transpose(0, 1 + out_spec[0], *(1 + d for d in out_spec[2:]), 1 + out_spec[1])
  offsets = list(itertools.product(*map(range, window)))
  rows = lambda z: _grouped_rows(z, groups)
  unit = all(s == 1 for s in prm["window_strides"]) and all(d == 1 for d in prm["lhs_dilation"])
  if unit and y.shape[-1] <= x.shape[-1]:
    # Input pixel s meets output pixel s − k·r + lo through offset k (r: kernel dilation).
    extra = [(w - 1) * r for w, r in zip(window, prm["rhs_dilation"])]
    pads = [(e - lo, e - hi, 0) for e, (lo, hi) in zip(extra, prm["padding"])]
    shifted = lax.pad(y, jnp.zeros((), y.dtype), [(0, 0, 0), (0, 0, 0), *pads, (0, 0, 0)])
    starts = [[e - o * r for e, o, r in zip(extra, offset, prm["rhs_dilation"])] for offset in offsets]
    view = _strided_views(shifted, starts, x.shape[2:-1], (1,) * len(window))
    return Blocks(len(offsets), lambda k: (rows(x), rows(view(k))), "x")
  pads = [(lo, hi, dilation - 1) for (lo, hi), dilation in zip(prm["padding"], prm["lhs_dilation"])]
  padded = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (0, 0, 0), *pads, (0, 0, 0)])
  starts = [[o * r for o, r in zip(offset, prm["rhs_dilation"])] for offset in offsets]
  view = _strided_views(padded, starts, y.shape[2:-1], tuple(prm["window_strides"]))
  return Blocks(len(offsets), lambda k: (rows(view(k)), rows(y)), "y")


def _grouped_rows(z: jax.Array, groups: int) -> jax.Array:
  """(B, ..., C) as (B, G, rows, C/G): group g holds channels [g·C/G, (g+1)·C/G)."""
  return z.reshape(z.shape[0], -1, groups, z.shape[-1] // groups).transpose(0, 2, 1, 3)


def _strided_views(z, starts, size, strides):
  """``view(k)``: the (B, n, *size, C) pixels of ``z`` (B, n, *spatial, C) from
  ``starts[k]`` with ``strides``; k a Python int or a traced int32."""
  b, n, c = z.shape[0], z.shape[1], z.shape[-1]
  span = [(extent - 1) * stride + 1 for extent, stride in zip(size, strides)]

  def view(k):
    if isinstance(k, int):
      limit = [s + extent for s, extent in zip(starts[k], span)]
      return lax.slice(z, (0, 0, *starts[k], 0), (b, n, *limit, c), (1, 1, *strides, 1))
    # One index dtype for every start (under jax_enable_x64 a Python 0 is int64).
    start = jnp.asarray([[0, 0, *s, 0] for s in starts], jnp.int32)[jnp.asarray(k, jnp.int32)]
    pixels = lax.dynamic_slice(z, start, (b, n, *span, c))
    return lax.slice(pixels, (0,) * pixels.ndim, pixels.shape, (1, 1, *strides, 1))

  return view



def _conv_kernel_blocks(tap: Tap, kernel: jax.Array) -> jax.Array:
  """A convolution's kernel as (K, G, C, F): K kernel offsets (in :func:`_conv_blocks`'
  order), G feature groups, C input and F output channels per group."""
  _, rhs_spec, _ = compat.param(tap.eqn, "dimension_numbers")
  groups = compat.param(tap.eqn, "feature_group_count")
  w = kernel.transpose(*rhs_spec[2:], rhs_spec[0], rhs_spec[1])  # (*window, O, I)
  w = w.reshape(-1, groups, w.shape[-2] // groups, w.shape[-1])  # (K, G, F, C)
  return w.transpose(0, 1, 3, 2)
