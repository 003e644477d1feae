"""The cost model: ρ per backend, the Gram-or-product choice per layer, and the product form's
chunks of the batch on XLA:CPU.
"""

from __future__ import annotations


import jax

from divebatch_jax.stats import _jax_compat as compat


# ρ of the cost model "gram iff ρ·T·(C+F) <= C·F", per backend. CPU: 12, from the
# library's own taps on dense layers over sequences, the product form looping over chunks
# of the batch (benchmarks/sequence_forms.py, results/sequence_forms_cpu.md: the faster
# form changes above ρ = 12.8 for a D = 128 MLP (the product form won at every T), between
# 12.8 and 25.6 for D = 256, between 4 and 8 for a D = 128 projection and 8 and 16 for
# D = 256. At 12 three short-sequence layers take the slower form, by 0.08-0.14× of a
# plain step: MLP D = 128 at T = 8 and D = 256 at T = 16, projection D = 128 at T = 8).
# GPU: on an H100 batched small products beat Gram matrices up to ρ ≈ 4 (layer_forms_gpu.md).
GRAM_COST_FACTOR = {"cpu": 12.0, "gpu": 4.0, "cuda": 4.0, "rocm": 4.0, "tpu": 4.0}


# XLA:CPU: a product-form layer whose batch of per-example gradients takes more than
# _UNCHUNKED_BYTES forms them about _CHUNK_BYTES at a time (see _product_tap).
_CHUNK_BYTES = 1 << 20


_UNCHUNKED_BYTES = 8 << 20


# With <g_i, ḡ> wanted, up to this many bytes of a layer's per-example gradients are formed
# at once and kept for <G_i, ḡ>; beyond, the loop, and <Ȳ_i, X_i ḡ> by one more forward
# product (GPT d = 128 / 256 of results/stats_overhead_gpt_cpu.md: kept, 64 MiB a layer
# cost less than the forward product; 256 MiB a layer cost more).
_LINKED_UNCHUNKED_BYTES = 128 << 20


def gram_factor(backend: str | None = None) -> float:
  """ρ of the cost model on ``backend`` (default: JAX's default backend)."""
  return GRAM_COST_FACTOR.get(backend or jax.default_backend(), 4.0)


def _gram_ratio(sizes: tuple[int, int, int], factor: float) -> float:
  rows, inputs, outputs = sizes
  return factor * rows * (inputs + outputs) / (inputs * outputs)


def _choose_form(kind: str, sizes: tuple[int, int, int], kernel_size: int, factor: float) -> str:
  """Gram matrices cost ~ρ·T²·(C+F) per example, the product T·C·F (lookups: T²·D
  against a per-example table of ``kernel_size`` entries)."""
  rows, _, width = sizes
  if kind == compat.GATHER:
    return "gram" if rows**2 * width <= kernel_size else "product"
  return "gram" if _gram_ratio(sizes, factor) <= 1.0 else "product"


def _chunk_size(batch: int, kernel_size: int, chunked: bool, linked: bool) -> int | None:
  """Examples per chunk of the product form's loop over the batch, or None (no loop):
  with ``chunked`` (XLA:CPU), where the batch's per-example gradients take more than
  :data:`_UNCHUNKED_BYTES` (``linked``, <g_i, ḡ> wanted: :data:`_LINKED_UNCHUNKED_BYTES`),
  about :data:`_CHUNK_BYTES` of them a chunk."""
  target = max(1, _CHUNK_BYTES // (4 * kernel_size))
  limit = _LINKED_UNCHUNKED_BYTES if linked else _UNCHUNKED_BYTES
  if not chunked or 4 * batch * kernel_size <= limit or target >= batch:
    return None
  return -(-batch // -(-batch // target))  # as even as the chunk count allows

