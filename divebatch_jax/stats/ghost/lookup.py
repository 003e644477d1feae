"""Row ``gather`` lookups (embeddings): row ids and cotangents per example, and the Gram form's
norms.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from divebatch_jax.stats import _jax_compat as compat


# Gather modes for which the row a lookup reads is known (PROMISE_IN_BOUNDS clamps).
_CLAMPED_LOOKUPS = compat.CLAMPED_GATHER_MODES


def _lookup_operands(eqn, kernel_pos, indices, cotangent):
  """(T,) row ids (the row count where a lookup reads nothing) and (T, D) cotangents."""
  del kernel_pos  # always the table
  num_rows = eqn.invars[0].aval.shape[0]
  offset_dims = compat.param(eqn, "dimension_numbers").offset_dims
  row_dims = [d for d in range(cotangent.ndim) if d not in offset_dims]
  rows = math.prod(cotangent.shape[d] for d in row_dims)
  y = cotangent.transpose(*row_dims, *offset_dims).reshape(rows, -1)
  ids = indices[..., 0].reshape(rows)
  if compat.param(eqn, "mode") in _CLAMPED_LOOKUPS:
    return jnp.clip(ids, 0, num_rows - 1), y
  return jnp.where((ids >= 0) & (ids < num_rows), ids, num_rows), y  # FILL_OR_DROP


def _lookup_blocks(eqn, kernel_pos, indices, cotangents):
  return jax.vmap(lambda a, c: _lookup_operands(eqn, kernel_pos, a, c))(indices, cotangents)


def _is_row_lookup(eqn) -> bool:
  dims = compat.param(eqn, "dimension_numbers")
  table = eqn.invars[0].aval.shape
  return (
      dims.collapsed_slice_dims == (0,)
      and dims.start_index_map == (0,)
      and not dims.operand_batching_dims
      and tuple(compat.param(eqn, "slice_sizes")) == (1, *table[1:])
      and eqn.invars[1].aval.shape[-1] == 1
      and compat.param(eqn, "mode") in (*_CLAMPED_LOOKUPS, compat.FILL_OR_DROP)
  )


def _lookup_gram_sq_norms(num_rows: int, ids: jax.Array, y: jax.Array) -> jax.Array:
  """(Σ_{t,s} [id_t = id_s] <ȳ_t, ȳ_s>)_i for ids (B, T) (num_rows: no row), y (B, T, D)."""
  same = (ids[:, :, None] == ids[:, None, :]) & (ids < num_rows)[:, :, None]
  gram_y = jnp.einsum("btd,bsd->bts", y, y, preferred_element_type=jnp.float32)
  return jnp.sum(jnp.where(same, gram_y, 0.0), axis=(1, 2))

