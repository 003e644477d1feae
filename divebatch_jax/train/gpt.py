"""A GPT-style character language model in flax nnx (``--model gpt``).

For token ids ``x`` of shape ``(B, T)`` over a vocabulary of V tokens::

    h_0 = E[x] + P[:T]                                    token + learned position tables
    h_l = h'_l + MLP(LN(h'_l)),  h'_l = h_{l-1} + Attn(LN(h_{l-1}))     pre-LayerNorm block
    logits = LN(h_L) Eᵀ                                   head tied to the token table

``Attn`` is causal multi-head self-attention (position t attends to positions <= t,
softmax(q kᵀ / √d_head) v) and ``MLP(h) = W_2 GELU(W_1 h)`` with a 4× hidden width.
The ``depth`` blocks are created at once by ``nnx.vmap`` (their parameters stacked
along a leading layer axis) and applied by ``nnx.scan`` over that axis, so the
forward pass compiles one block whatever the depth; ``unroll`` is lax.scan's
(``True`` unrolls every layer, trading compile time for speed on small models).
``remat`` wraps each block in ``nnx.remat`` (``jax.checkpoint``): the backward pass
recomputes a block's activations instead of keeping them. The compute dtype is every
layer's ``dtype`` (:func:`divebatch_jax.train.models.set_compute_dtype`; parameters
stay float32, the logits come back as float32).

Every parameter carries logical axis names (flax's partitioning metadata,
``nnx.with_partitioning``): ``"vocab"``, ``"embed"`` (the residual width), ``"heads"``
(attention's q/k/v features), ``"mlp"`` (the hidden width), ``"layers"`` (the stacked
blocks), ``"norm"`` (LayerNorm's scale and bias).
:func:`divebatch_jax.train.parallel.param_shardings` maps them onto a mesh's axes
(FSDP over ``"embed"``, tensor parallelism over ``"heads"`` and ``"mlp"``).

Sizes (:data:`GPT_SIZES`, parameters at V = 65 and each size's context; `--context` replaces it):

====================  =====  =====  =====  =======  ============
model name            depth  width  heads  context  parameters
====================  =====  =====  =====  =======  ============
``gpt`` (CPU)         2      64     4      64       ≈ 0.11M
``gpt-small`` (CPU)   4      128    4      128      ≈ 0.82M
``gpt-10m`` (GPU)     6      384    6      256      ≈ 10.8M
====================  =====  =====  =====  =======  ============

Example (causal: changing the last token leaves the logits of every earlier position)::

    >>> import jax.numpy as jnp
    >>> from divebatch_jax.train import gpt
    >>> model = gpt.GPT(gpt.GPT_SIZES["gpt"]._replace(context=16), vocab_size=65, seed=0)
    >>> tokens = jnp.zeros((2, 16), jnp.int32).at[1, -1].set(7)   # two rows, apart in the last token
    >>> logits = model(tokens)
    >>> logits.shape
    (2, 16, 65)
    >>> bool(jnp.allclose(logits[0, :-1], logits[1, :-1])), bool(jnp.allclose(logits[0, -1], logits[1, -1]))
    (True, False)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


class GPTSize(NamedTuple):
  """Shape of a :class:`GPT`: blocks, width, attention heads, context (tokens),
  lax.scan's ``unroll`` for the blocks, and whether each block is rematerialised."""

  depth: int
  width: int
  heads: int
  context: int
  unroll: int | bool = 1
  remat: bool = False


GPT_SIZES = {
    "gpt": GPTSize(depth=2, width=64, heads=4, context=64),
    "gpt-small": GPTSize(depth=4, width=128, heads=4, context=128),
    "gpt-10m": GPTSize(depth=6, width=384, heads=6, context=256),
}
_INIT = nnx.initializers.normal(0.02)


def with_axes(init, *names: str | None):
  """``init`` with the parameter's logical axis names (flax's partitioning metadata;
  placed on a mesh later, by the run, not when the model is built)."""
  return nnx.with_partitioning(init, names, eager_sharding=False)


def _linear(d_in: int, d_out: int, axes: tuple, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, kernel_init=with_axes(_INIT, *axes), bias_init=with_axes(nnx.initializers.zeros_init(), axes[1]),
                    rngs=rngs)


def _layer_norm(width: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(width, scale_init=with_axes(nnx.initializers.ones_init(), "norm"),
                       bias_init=with_axes(nnx.initializers.zeros_init(), "norm"), rngs=rngs)


class Block(nnx.Module):
  """One pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.attn_norm = _layer_norm(width, rngs)
    self.qkv = _linear(width, 3 * width, ("embed", "heads"), rngs)
    self.proj = _linear(width, width, ("heads", "embed"), rngs)
    self.mlp_norm = _layer_norm(width, rngs)
    self.fc = _linear(width, 4 * width, ("embed", "mlp"), rngs)
    self.out = _linear(4 * width, width, ("mlp", "embed"), rngs)

  def attention(self, h: jax.Array) -> jax.Array:
    batch, length, width = h.shape
    q, k, v = jnp.split(self.qkv(h), 3, axis=-1)
    split = lambda t: t.reshape(batch, length, self.heads, width // self.heads)
    q, k, v = split(q), split(k), split(v)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(width // self.heads)
    causal = jnp.tril(jnp.ones((length, length), bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
    return self.proj(mixed)

  def __call__(self, h: jax.Array) -> jax.Array:
    h = h + self.attention(self.attn_norm(h))
    return h + self.out(jax.nn.gelu(self.fc(self.mlp_norm(h))))


class GPT(nnx.Module):
  """Token + position tables, ``depth`` stacked blocks (nnx.vmap / nnx.scan), a tied head.

  Args:
    size: a :class:`GPTSize` (depth, width, heads, context, unroll, remat).
    vocab_size: V, tokens in the vocabulary.
    seed: initialisation seed.
  """

  def __init__(self, size: GPTSize, *, vocab_size: int, seed: int):
    for name in ("depth", "width", "heads", "context"):
      value = getattr(size, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"GPT {name} must be an int >= 1, got {value!r}.")
    if size.width % size.heads:
      raise ValueError(f"GPT width ({size.width}) must be a multiple of heads ({size.heads}).")
    rngs = nnx.Rngs(seed)
    self.size = size
    self.dtype = None  # the compute dtype of the position table's add (set_compute_dtype)
    self.tokens = nnx.Embed(vocab_size, size.width, embedding_init=with_axes(_INIT, "vocab", "embed"), rngs=rngs)
    self.positions = nnx.Param(_INIT(rngs.params(), (size.context, size.width)), out_sharding=(None, "embed"),
                               eager_sharding=False)

    @nnx.split_rngs(splits=size.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stacked(rngs: nnx.Rngs) -> Block:
      return Block(size.width, size.heads, rngs=rngs)

    self.blocks = stacked(rngs)
    self.final_norm = _layer_norm(size.width, rngs)

  def __call__(self, x: jax.Array, *, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
    """``(B, T)`` token ids (T <= context) -> ``(B, T, V)`` next-token logits."""
    del train, mask  # no dropout, no batch statistics: rows are independent
    if not jnp.issubdtype(x.dtype, jnp.integer) or x.ndim != 2 or x.shape[1] > self.size.context:
      raise ValueError(
          f"x must be (B, T) integer token ids with T <= context {self.size.context}, got "
          f"{x.dtype} {x.shape}."
      )
    h = self.tokens(x) + self.positions[: x.shape[1]].astype(self.dtype or self.positions.dtype)
    apply = nnx.remat(lambda block, h: block(h)) if self.size.remat else (lambda block, h: block(h))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, unroll=self.size.unroll,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def through(h: jax.Array, block: Block) -> jax.Array:
      return apply(block, h)

    h = through(h, self.blocks)
    return self.tokens.attend(self.final_norm(h)).astype(jnp.float32)
