"""A small GPT-style model for the statistics tests and benchmarks/stats_overhead.py.

For token ids ``x`` (B, T) over a vocabulary of V tokens::

    h_0 = E[x] + P[arange(T)]                         token table, position table
    h'_l = h_{l-1} + Attn(LN(h_{l-1})),  h_l = h'_l + W_2 GELU(W_1 LN(h'_l))
    logits = LN(h_L) Eᵀ                               head tied to the token table

with causal multi-head attention. ``scan=True`` creates the blocks at once with
``nnx.vmap`` (parameters stacked on a leading layer axis) and applies them with
``nnx.scan``, as MaxText- and Levanter-style models do; ``scan=False`` keeps a list.
``remat=True`` (or a policy of ``jax.checkpoint_policies``) wraps every block in
``nnx.remat``: its activations are recomputed in the backward pass (``remat_kwargs``:
more of ``nnx.remat``'s arguments, e.g. ``prevent_cse=False`` as inside a scan).

Example::

    model = TinyGPT(vocab=32, context=8, width=16, heads=2, depth=2, scan=True, rngs=nnx.Rngs(0))
    logits = model(jnp.zeros((3, 8), jnp.int32))      # (3, 8, 32)
"""

import jax
import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
  """Pre-LayerNorm block: causal self-attention, then a GELU MLP (4x width)."""

  def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
    self.heads = heads
    self.attn_norm = nnx.LayerNorm(width, rngs=rngs)
    self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
    self.proj = nnx.Linear(width, width, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(width, rngs=rngs)
    self.fc = nnx.Linear(width, 4 * width, rngs=rngs)
    self.out = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, h):
    b, t, d = h.shape
    q, k, v = jnp.split(self.qkv(self.attn_norm(h)), 3, axis=-1)
    heads = lambda z: z.reshape(b, t, self.heads, d // self.heads)
    scores = jnp.einsum("bqhd,bkhd->bhqk", heads(q), heads(k)) / jnp.sqrt(d // self.heads)
    causal = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
    h = h + self.proj(jnp.einsum("bhqk,bkhd->bqhd", weights, heads(v)).reshape(b, t, d))
    return h + self.out(jax.nn.gelu(self.fc(self.mlp_norm(h))))


class TinyGPT(nnx.Module):
  def __init__(self, vocab, context, width, heads, depth, *, scan, rngs, remat=False, remat_kwargs=None):
    self.context, self.scan = context, scan
    self.remat = nnx.data(None) if remat is False else nnx.static(remat)
    self.remat_kwargs = nnx.static(dict(remat_kwargs or {}))
    self.tokens = nnx.Embed(vocab, width, rngs=rngs)
    self.positions = nnx.Embed(context, width, rngs=rngs)
    if scan:
      make = nnx.vmap(lambda r: Block(width, heads, r), in_axes=0, out_axes=0)
      self.blocks = make(nnx.Rngs(rngs.params()).split(depth))
    else:
      self.blocks = nnx.List([Block(width, heads, rngs) for _ in range(depth)])
    self.final_norm = nnx.LayerNorm(width, rngs=rngs)

  def _apply(self, block, h):
    if self.remat is None:
      return block(h)
    policy = None if self.remat is True else self.remat
    return nnx.remat(lambda b, x: b(x), policy=policy, **self.remat_kwargs)(block, h)

  def __call__(self, ids):
    h = self.tokens(ids) + self.positions(jnp.arange(ids.shape[1]))[None]
    if self.scan:
      h = nnx.scan(lambda h, block: (self._apply(block, h), None), in_axes=(nnx.Carry, 0))(h, self.blocks)[0]
    else:
      for block in self.blocks:
        h = self._apply(block, h)
    return self.tokens.attend(self.final_norm(h))


def gpt_loss(model):
  """``(loss_fn, params)``: next-token cross entropy per sequence, summed over positions."""
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(p, batch):
    logits = nnx.merge(graphdef, p)(batch["ids"])
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.take_along_axis(log_probs, batch["next"][..., None], -1)[..., 0], -1)

  return loss_fn, params


def gpt_batch(b, context, vocab, seed=0):
  ids = jax.random.randint(jax.random.key(seed), (b, context + 1), 0, vocab)
  return {"ids": ids[:, :-1], "next": ids[:, 1:]}
