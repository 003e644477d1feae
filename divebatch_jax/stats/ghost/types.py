"""What the taps decide and carry: a leaf's view (:class:`LeafView`), a tapped layer
(:class:`Tap`), the plan (:class:`GhostPlan`) and a product layer's blocks
(:class:`Blocks`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

from divebatch_jax.stats import _jax_compat as compat
from divebatch_jax.stats.ghost.cost import _gram_ratio, gram_factor


PyTree = Any


Path = tuple[int, ...]  # index of an equation at each level of nested jaxprs


class LeafView(NamedTuple):
  """A variable holding parameter leaf ``leaf`` after the reshapes/transposes ``layout``."""

  leaf: int  # index of the parameter leaf in jax.tree.leaves(params)
  layout: tuple[compat.JaxprEqn, ...] = ()
  # ghost_sums' direction d for <g_i, d>, laid out (and sliced in scans) like this variable.
  direction: jax.Array | None = None


class Tap(NamedTuple):
  """One tapped layer: the equation, which operand is the parameter, the form used.

  ``sizes`` is ``(T, C, F)`` per example for products (rows, inputs, outputs) and
  ``(T, table entries, D)`` for lookups: what the cost model compared.
  """

  kind: str  # "dot_general" | "conv_general_dilated" | "gather"
  kernel: LeafView
  kernel_pos: int  # operand position of the leaf in the equation
  eqn: compat.JaxprEqn
  form: str  # "gram" | "product"
  sizes: tuple[int, int, int]
  # A product tied to an earlier row lookup of the same (rows, D) table: the lookup's
  # path, and which axis of this layer's blocks, "C" or "F", runs over the table's rows.
  tied_lookup: tuple[Path, str] | None = None
  # A product layer's examples per chunk of its loop over the batch (XLA:CPU, large
  # per-example gradients: _chunk_size), set by ghost_sums for its batch; None: no loop.
  chunk: int | None = None

  def links_rows(self) -> bool:
    """Whether <g_i, v> comes from the layer's output cotangent Ȳ_i (and input X_i) by
    one more forward product -- Gram form; a product layer that loops over the batch,
    whose example gradients are never all in memory -- rather than from the example's
    gradient itself."""
    return self.form == "gram" or self.chunk is not None


class GhostPlan(NamedTuple):
  """How :func:`ghost_sums` covers each parameter leaf of one loss at one batch shape.

  Attributes:
    jaxpr: the loss of one example (batch axis of size 1), traced.
    taps: the tapped layers by equation path.
    per_example_leaves: leaves given per-example gradients from broadcast copies.
    elementwise_leaves: those of them read only elementwise (biases, norm scales).
    leaf_names: ``jax.tree_util.keystr`` of each leaf, for :meth:`describe`.
    leaf_sizes: number of entries of each leaf.
    gram_factor: the cost model's ρ for the backend the plan was made for.
    loop_blocks: sum a convolution's per-offset Gram matrices in a loop (XLA:CPU,
      where unrolled blocks are all materialised at once) rather than unrolled, and
      form large product-form gradients in chunks of the batch (:func:`_chunk_size`).
    opaque_reads: ``(leaf, primitive names)`` of fallback leaves read by higher-order
      primitives the walker does not know (``cond``, ``while``, custom derivative
      rules, ...), named by :meth:`describe`.
  """

  jaxpr: compat.ClosedJaxpr
  taps: dict[Path, Tap]
  per_example_leaves: tuple[int, ...]
  elementwise_leaves: tuple[int, ...]
  leaf_names: tuple[str, ...]
  leaf_sizes: tuple[int, ...]
  gram_factor: float
  loop_blocks: bool
  opaque_reads: tuple[tuple[int, tuple[str, ...]], ...] = ()

  def fallback_leaves(self) -> tuple[int, ...]:
    """Leaves neither tapped nor elementwise: exact, but B copies of the leaf each."""
    return tuple(i for i in self.per_example_leaves if i not in self.elementwise_leaves)

  def fallback_share(self) -> float:
    """Share of the parameter entries in :meth:`fallback_leaves` (1.0 for no parameters)."""
    total = sum(self.leaf_sizes)
    return sum(self.leaf_sizes[i] for i in self.fallback_leaves()) / total if total else 1.0

  def describe(self) -> dict[str, str]:
    """``{leaf name: how its per-example norm is computed}`` for every leaf.

    Tapped layers read ``"<primitive> (<form>) T=.. C=.. F=.. gram/product=r"``: the
    decision and the cost model's inputs (``r`` = ρ·T·(C+F) / (C·F), gram iff r <= 1;
    for lookups ``T=.. table=.. D=..``). Other leaves: ``"elementwise"``,
    ``"per-example fallback"`` (naming the higher-order primitive that caused it, if
    any: ``"per-example fallback (read by cond: ...)"``) or ``"unused"``.
    """
    how = {i: "unused" for i in range(len(self.leaf_names))}
    how.update({i: "per-example fallback" for i in self.per_example_leaves})
    how.update({i: "elementwise" for i in self.elementwise_leaves})
    for i, primitives in self.opaque_reads:
      how[i] += f" (read by {', '.join(primitives)}: a higher-order primitive the taps do not walk)"
    for t in self.taps.values():
      rows, inputs, outputs = t.sizes
      if t.kind == compat.GATHER:
        detail = f"T={rows} table={inputs} D={outputs}"
      else:
        detail = f"T={rows} C={inputs} F={outputs} gram/product={_gram_ratio(t.sizes, self.gram_factor):.3g}"
      if t.tied_lookup is not None:  # follows its lookup in trace order
        how[t.kernel.leaf] += (
            f" + {t.kind} ({t.form}) {detail}, tied: norms of both uses + 2<g_lookup, g_{t.kind}> "
            f"from the {t.kind}'s gradient rows at the looked-up ids"
        )
      else:
        how[t.kernel.leaf] = f"{t.kind} ({t.form}) {detail}"
    return {self.leaf_names[i]: how[i] for i in sorted(how)}


class Blocks(NamedTuple):
  """A product layer's operands over a batch.

  ``pair(k)`` returns block k's ``(X_k, Y_k)``, (B, G, T, C) and (B, G, T, F); k is a
  Python int, or a traced int32 when the blocks are visited in a loop. ``fixed`` says
  which of the two is the same array in every block: ``"x"`` or ``"y"``.
  """

  count: int
  pair: Callable[[Any], tuple[jax.Array, jax.Array]]
  fixed: str

