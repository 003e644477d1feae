"""``dot_general`` layers (dense layers, attention projections, einsums): the per-example
blocks (G, T, C) / (G, T, F) and the kernel laid out like them.
"""

from __future__ import annotations

import math

import jax

from divebatch_jax.stats import _jax_compat as compat
from divebatch_jax.stats.ghost.types import Blocks, Tap


def _dot_operands(eqn, kernel_pos, activation, cotangent):
  """One example: the activation as (G, T, C), the cotangent as (G, T, F)."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = compat.param(eqn, "dimension_numbers")
  contract = (lhs_contract, rhs_contract)[1 - kernel_pos]
  batch = (lhs_batch, rhs_batch)[1 - kernel_pos]
  free = [d for d in range(activation.ndim) if d not in contract and d not in batch]
  groups = math.prod(activation.shape[d] for d in batch)
  rows = math.prod(activation.shape[d] for d in free)
  x = activation.transpose(*batch, *free, *contract).reshape(groups, rows, -1)
  # Output axes: batch, lhs free, rhs free. Put the activation's free axes first.
  nb, na = len(batch), len(free)
  nk = cotangent.ndim - nb - na
  if kernel_pos == 0:
    order = [*range(nb), *range(nb + nk, nb + nk + na), *range(nb, nb + nk)]
    cotangent = cotangent.transpose(order)
  return x, cotangent.reshape(groups, rows, -1)


def _dot_blocks(eqn, kernel_pos, activations, cotangents) -> Blocks:
  x, y = jax.vmap(lambda a, c: _dot_operands(eqn, kernel_pos, a, c))(activations, cotangents)
  return Blocks(1, lambda k: (x, y), "x")



def _dot_kernel_blocks(tap: Tap, kernel: jax.Array) -> jax.Array:
  """A dot product's kernel operand as (1, G, C, F): its flattened batch, contracting
  and free axes."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = compat.param(tap.eqn, "dimension_numbers")
  contract = (lhs_contract, rhs_contract)[tap.kernel_pos]
  batch = (lhs_batch, rhs_batch)[tap.kernel_pos]
  free = [d for d in range(kernel.ndim) if d not in contract and d not in batch]
  size = lambda dims: math.prod(kernel.shape[d] for d in dims)
  w = kernel.transpose(*batch, *contract, *free)
  return w.reshape(1, size(batch), size(contract), size(free))
