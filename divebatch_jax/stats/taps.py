"""Per-layer taps: per-example gradient norms without a per-example pass over the network.

A layer that multiplies the T rows of example i (pixels, tokens; T = 1 for a plain
dense layer) by a kernel W has the per-example kernel gradient g_i = X_iᵀ Ȳ_i, with
X_i (T×C) the layer input and Ȳ_i (T×F) the cotangent of its output. Two forms::

    ||g_i||² = <X_i X_iᵀ, Ȳ_i Ȳ_iᵀ>    "gram":    T²·(C+F) work, T² memory per example
    g_i      = X_iᵀ Ȳ_i                "product": T·C·F work (the FLOPs of the ordinary
                                                  weight gradient), C·F memory; the sum
                                                  over examples IS the summed gradient

A convolution is the same product with X_i its input patches, taken one kernel
offset at a time: block k pairs the input with the output cotangent shifted by k
(unit strides; the narrower side is shifted) or the cotangent with the input pixels
offset k meets (strided), a shifted view and no unfolded copy; any strides, padding,
dilations and feature groups. In the product form the layer's backward pass runs over
the whole batch (a ``custom_vmap`` rule): each block's per-example gradient G_ik adds
||G_ik||² to example i's norm, and the blocks' sum over the batch is block k of the
kernel gradient; on XLA:CPU, where the batch's per-example gradients are large, they
are formed a chunk of examples at a time in a loop and squared and summed while in
cache. The cost model picks, per layer, "gram" iff

    ρ · T · (C + F) <= C · F          (ρ per backend, :data:`GRAM_COST_FACTOR`)

calibrated on each backend by ``benchmarks/layer_forms.py`` (batched small matrix
products run at a lower rate than Gram matrices on GPUs). An embedding lookup
y_t = E[id_t] has ||g_i||² = Σ_{t,s} [id_t = id_s] <ȳ_t, ȳ_s> ("gram", T²·D) or the
rows scattered into a per-example table ("product", the table's size).

Leaves read only by elementwise arithmetic (biases; GroupNorm / LayerNorm / RMSNorm
and eval-mode BatchNorm scales and offsets) are tapped where they enter: the loss
is evaluated with one broadcast copy of the leaf per example, so its per-example
gradients come out of the same backward pass as (B, C) arrays ("elementwise").
Three more cases are tapped:

* stacked weights scanned over by ``lax.scan`` (``nnx.scan``, linen ``nn.scan``):
  each iteration's slice is an ordinary leaf of the body and the slices' squared
  norms add up (disjoint parts of the leaf);
* a table looked up and then read by one ``dot_general`` (a tied embedding and
  output head): g_i = g_lookup + g_product, so ||g_i||² adds the two uses' norms
  and 2<g_lookup, g_product> = 2 Σ_t <ȳ_t, g_product[id_t]>, whose rows
  g_product[id_t] = (X_iᵀ Ȳ_i)[id_t] the product's backward pass forms from Ȳ's
  columns at the T looked-up ids (T²·D work, no copy of the table);
* a layer on a constant input (a position table at ``arange(T)``): the input is
  given a per-example copy, so each example has its own output cotangent.

The broadcast-copy mechanism is the fallback for the rest (a weight read by two
products or two lookups, weights closed over by a scan body, custom derivative
rules): exact, but B copies of the leaf ("per-example fallback");
:meth:`GhostPlan.describe` names every such leaf.

:func:`trace_plan` traces the per-example loss to a jaxpr and finds every
``dot_general`` / ``conv_general_dilated`` whose kernel operand, and every row
``gather`` whose table, is a parameter leaf used there and nowhere else (through
casts, reshapes, transposes, nested ``jit`` calls, scans and checkpoints:
``jax.checkpoint`` / ``nnx.remat`` / linen ``nn.remat`` bodies are walked and re-wrapped
in ``jax.checkpoint`` with the user's policy and ``prevent_cse``, so the statistics
step recomputes what the user's step recomputes). :func:`ghost_sums` then
re-evaluates that jaxpr, vmapped over the batch, each tapped layer with a custom
backward pass that adds its examples' squared norms to per-example probes; the
elementwise leaves' per-example gradients come from the same pass. So flax nnx, linen
and plain-JAX losses work unchanged. The same pass gives <g_i, v> per example, v a
given direction or the batch's own mean gradient ḡ: each tapped kernel then passes
through an identity whose backward pass runs after its layer's, when the kernel's
cotangent is that layer's summed gradient S (ḡ = S / count), and adds
<g_i^layer, v> from what the layer's backward pass had at hand (its example gradient,
or its output cotangent Ȳ_i and input X_i: <Ȳ_i, layer(X_i, v)>).

Every JAX internal this module leans on (jaxpr types, primitive names and parameters,
``get_bind_params``, the checkpoint primitive, ``custom_vmap``) goes through
:mod:`divebatch_jax.stats._jax_compat`, whose tests (``tests/test_jax_internals.py``)
name the internal that a JAX release changed.

Example (every output is 3, so each example's gradient is 2·3 = 6 in each of w's 6 and b's 2
entries: ||g_i||² = 8·36 = 288)::

    >>> import jax.numpy as jnp
    >>> from divebatch_jax.stats import taps
    >>> def loss_fn(p, batch):
    ...   return jnp.sum((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2, axis=-1)
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> batch = {"x": jnp.ones((5, 3)), "y": jnp.zeros((5, 2))}
    >>> plan = taps.trace_plan(loss_fn, params, batch)
    >>> {leaf: form.split(" ")[0] for leaf, form in sorted(plan.describe().items())}
    {"['b']": 'elementwise', "['w']": 'dot_general'}
    >>> sums = taps.ghost_sums(loss_fn, params, batch, jnp.ones(5, bool))
    >>> float(sums.loss_sum), sums.sq_norms.tolist(), sums.sum_g["b"].tolist()
    (90.0, [288.0, 288.0, 288.0, 288.0, 288.0], [30.0, 30.0])
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from divebatch_jax.stats import _jax_compat as compat

PyTree = Any
Path = tuple[int, ...]  # index of an equation at each level of nested jaxprs

# One-input primitives whose output holds exactly the elements of their input: a
# gradient through them keeps its norm, so their output still counts as the leaf.
_ELEMENT_PRESERVING = compat.ELEMENT_PRESERVING
# Call primitives whose body is walked in place when a parameter enters them.
_INLINED_CALLS = compat.CALL_PRIMITIVES | compat.CHECKPOINT_PRIMITIVES
# Primitives through which a leaf enters the computation elementwise: its per-example
# gradient is a (B, *leaf shape) array from the broadcast copies, cheap for small leaves.
_ELEMENTWISE = compat.ELEMENTWISE
# ρ of the cost model "gram iff ρ·T·(C+F) <= C·F", per backend. CPU: 12, from the
# library's own taps on dense layers over sequences, the product form looping over chunks
# of the batch (benchmarks/sequence_forms.py, results/sequence_forms_cpu.md: the faster
# form changes above ρ = 12.8 for a D = 128 MLP (the product form won at every T), between
# 12.8 and 25.6 for D = 256, between 4 and 8 for a D = 128 projection and 8 and 16 for
# D = 256. At 12 three short-sequence layers take the slower form, by 0.08-0.14× of a
# plain step: MLP D = 128 at T = 8 and D = 256 at T = 16, projection D = 128 at T = 8).
# GPU: on an H100 batched small products beat Gram matrices up to ρ ≈ 4 (layer_forms_gpu.md).
GRAM_COST_FACTOR = {"cpu": 12.0, "gpu": 4.0, "cuda": 4.0, "rocm": 4.0, "tpu": 4.0}
# The name of ghost_sums' vmapped example axis: a product-form lookup's backward pass sums
# its table gradient over the batch with lax.psum over it.
EXAMPLE_AXIS = "divebatch_examples"
# XLA:CPU: a product-form layer whose batch of per-example gradients takes more than
# _UNCHUNKED_BYTES forms them about _CHUNK_BYTES at a time (see _product_tap).
_CHUNK_BYTES = 1 << 20
_UNCHUNKED_BYTES = 8 << 20
# With <g_i, ḡ> wanted, up to this many bytes of a layer's per-example gradients are formed
# at once and kept for <G_i, ḡ>; beyond, the loop, and <Ȳ_i, X_i ḡ> by one more forward
# product (GPT d = 128 / 256 of results/stats_overhead_gpt_cpu.md: kept, 64 MiB a layer
# cost less than the forward product; 256 MiB a layer cost more).
_LINKED_UNCHUNKED_BYTES = 128 << 20
# Gather modes for which the row a lookup reads is known (PROMISE_IN_BOUNDS clamps).
_CLAMPED_LOOKUPS = compat.CLAMPED_GATHER_MODES


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


# --------------------------------------------------------------------------- walking a jaxpr

# visit(path, eqn, invals, leaf_at) is called for every equation that reads a parameter
# leaf (leaf_at: operand position -> LeafView) and is neither walked into nor
# element-preserving; it returns the equation's outputs, or None to evaluate it as is.
Visit = Callable[[Path, compat.JaxprEqn, list, dict[int, LeafView]], "list | None"]


def _bind(eqn: compat.JaxprEqn, invals: list) -> list:
  if compat.is_dot(eqn):
    return [_dot_without_unit_batch(eqn, *invals)]
  return compat.bind(eqn, invals)


def _dot_without_unit_batch(eqn: compat.JaxprEqn, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  """A ``dot_general`` equation bound with its batch dims of size 1 squeezed out and put
  back on the output. One example's program has a batch of one; vmapped, a batched
  matmul such as attention's "bqhd,bkhd->bhqk" keeps that unit dim among its batch
  dims, and XLA:CPU then lays the softmax's weights out twice (a transposed copy for
  the backward pass). Without it the vmapped dot is the batch's own: on the GPT of
  ``benchmarks/stats_overhead.py`` (d = 128, B = 64) the statistics step's bytes fall
  from 1.23× to 1.20× a plain step's."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = compat.param(eqn, "dimension_numbers")
  unit = [k for k, (l, r) in enumerate(zip(lhs_batch, rhs_batch)) if lhs.shape[l] == 1 and rhs.shape[r] == 1]
  if not unit:
    return compat.bind_dot(eqn, lhs, rhs, compat.param(eqn, "dimension_numbers"))

  def squeezed(x, batch, contract):
    drop = [batch[k] for k in unit]
    at = {d: i for i, d in enumerate(d for d in range(x.ndim) if d not in drop)}
    return lax.squeeze(x, drop), tuple(at[d] for d in batch if d not in drop), tuple(at[d] for d in contract)

  lhs, lhs_batch, lhs_contract = squeezed(lhs, lhs_batch, lhs_contract)
  rhs, rhs_batch, rhs_contract = squeezed(rhs, rhs_batch, rhs_contract)
  numbers = ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))
  out = compat.bind_dot(eqn, lhs, rhs, numbers)
  return lax.expand_dims(out, unit)  # the batch dims lead the output, in order


def _walk(jaxpr: compat.Jaxpr, consts, args, leaf_of: dict, path: Path, visit: Visit) -> list:
  """Evaluates ``jaxpr`` like ``jax.core.eval_jaxpr``, tracking which variables are leaves."""
  env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))

  def read(v):
    return v.val if isinstance(v, compat.Literal) else env[v]

  def leaf_view(v):
    return None if isinstance(v, compat.Literal) else leaf_of.get(v)

  for index, eqn in enumerate(jaxpr.eqns):
    here = path + (index,)
    invals = [read(v) for v in eqn.invars]
    leaf_at = {p: leaf_view(v) for p, v in enumerate(eqn.invars) if leaf_view(v) is not None}
    body = compat.call_body(eqn) if leaf_at else None
    if leaf_at and compat.scan_params(eqn) is not None:
      outs = _walk_scan(eqn, invals, leaf_at, here, visit)
    elif body is not None:
      outs = _walk_call(eqn, body, invals, leaf_at, leaf_of, here, visit)
    elif leaf_at and compat.primitive_name(eqn) in _ELEMENT_PRESERVING and len(eqn.invars) == 1:
      outs = _bind(eqn, invals)
      view = leaf_at[0]
      if compat.primitive_name(eqn) != compat.CONVERT:  # gradients stay float32
        direction = None if view.direction is None else _bind(eqn, [view.direction])[0]
        view = view._replace(layout=view.layout + (eqn,), direction=direction)
      leaf_of[eqn.outvars[0]] = view
    else:
      outs = (visit(here, eqn, invals, leaf_at) if leaf_at else None) or _bind(eqn, invals)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _walk_call(eqn, body: compat.ClosedJaxpr, invals: list, leaf_at: dict, leaf_of: dict, path: Path, visit: Visit) -> list:
  """A call (``jit``) or checkpoint equation whose body reads a leaf, walked in place.

  A checkpoint (``jax.checkpoint`` / ``jax.remat``, ``nnx.remat``, linen ``nn.remat``)
  is walked inside ``jax.checkpoint`` with the user's policy and ``prevent_cse``: the
  substituted body is rematerialised as the user's was, so the backward pass recomputes
  what the plain step recomputes (the taps' residuals -- a layer's input, its example
  gradients' operands -- are recomputed with it). A leaf returned by the body is the
  same leaf outside; from a checkpoint, with no direction (it would be a value of the
  checkpoint's trace) and a use recorded at the checkpoint (its leaf falls back,
  exact) unless the body returns it untouched.
  """
  inner = {body.jaxpr.invars[p]: view for p, view in leaf_at.items()}
  remat = compat.checkpoint_options(eqn)
  if remat is None:
    outs = _walk(body.jaxpr, body.consts, invals, inner, path, visit)
  else:
    walked = dict(inner)

    def walk(*args):
      return _walk(body.jaxpr, body.consts, list(args), walked, path, visit)

    outs = jax.checkpoint(walk, policy=remat.policy, prevent_cse=remat.prevent_cse)(*invals)
  returned = {}
  for position, (outer_v, inner_v) in enumerate(zip(eqn.outvars, body.jaxpr.outvars)):
    view = None if isinstance(inner_v, compat.Literal) else (inner if remat is None else walked).get(inner_v)
    if view is not None:
      leaf_of[outer_v] = view
      if remat is not None and inner_v not in inner:
        leaf_of[outer_v] = view._replace(direction=None)
        returned[position] = view
  if returned:
    visit(path, eqn, invals, {p: v._replace(direction=None) for p, v in returned.items()})
  return outs


def _trace_scope(jaxpr: compat.Jaxpr, path: Path) -> Path:
  """The path of the innermost checkpoint or scan around the equation at ``path`` (``()``:
  none). Values the taps pass between two uses of a leaf (a tied lookup's rows) must not
  leave the trace of the checkpoint or scan body they were formed in."""
  scope = ()
  for depth, index in enumerate(path[:-1]):
    eqn = jaxpr.eqns[index]
    scan = compat.scan_params(eqn)
    if scan is not None or compat.checkpoint_options(eqn) is not None:
      scope = path[: depth + 1]
    jaxpr = (scan.body if scan is not None else compat.call_body(eqn)).jaxpr
  return scope


def _walk_scan(eqn: compat.JaxprEqn, invals: list, leaf_at: dict[int, LeafView], path: Path, visit: Visit) -> list:
  """A ``lax.scan`` (``nnx.scan``, linen ``nn.scan``) re-run with its body walked.

  A leaf scanned over (an ``xs`` operand: stacked weights) is a different slice in
  every iteration, each an ordinary leaf of the body: taps there add each
  iteration's per-example squared norm to the same probe (a constant of the scan,
  whose cotangent is summed over the iterations), and the slices' norms add up to
  the leaf's. A leaf entering as a constant or a carry is used in every iteration:
  ``visit`` is told of it on the scan equation itself (which is no tappable layer).
  """
  prm = compat.scan_params(eqn)
  body, consts, carries = prm.body, prm.num_consts, prm.num_carry
  whole = {p: view for p, view in leaf_at.items() if p < consts + carries}
  if whole:
    visit(path, eqn, invals, whole)
  sliced = {p: view for p, view in leaf_at.items() if p >= consts + carries}
  directions = {p: view.direction for p, view in sliced.items() if view.direction is not None}

  def step(carry, xs):
    xs, direction_slices = xs
    args = [*invals[:consts], *carry, *xs]
    inner = {body.jaxpr.invars[p]: view._replace(direction=direction_slices.get(p)) for p, view in sliced.items()}
    outs = _walk(body.jaxpr, body.consts, args, inner, path, visit)
    return outs[:carries], outs[carries:]

  carry, ys = lax.scan(
      step, invals[consts : consts + carries], (invals[consts + carries :], directions),
      length=prm.length, reverse=prm.reverse, unroll=prm.unroll,
  )
  return [*carry, *ys]


# --------------------------------------------------------------------------- layer operands
# Over a batch, a product layer's operands are blocks X_k (B, G, T, C) of its input and
# Y_k (B, G, T, F) of its output cotangent, such that the kernel gradient of example i
# is made of the blocks X_ikᵀ Y_ik: one block for a dot product, one per kernel offset
# for a convolution (where one side is the same in every block). A lookup's are row ids
# (T,) and cotangents (T, D) per example.


class Blocks(NamedTuple):
  """A product layer's operands over a batch.

  ``pair(k)`` returns block k's ``(X_k, Y_k)``, (B, G, T, C) and (B, G, T, F); k is a
  Python int, or a traced int32 when the blocks are visited in a loop. ``fixed`` says
  which of the two is the same array in every block: ``"x"`` or ``"y"``.
  """

  count: int
  pair: Callable[[Any], tuple[jax.Array, jax.Array]]
  fixed: str


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


_BLOCKS = {compat.DOT: _dot_blocks, compat.CONV: _conv_blocks}


def _over_blocks(blocks: Blocks, fn, loop: bool) -> jax.Array:
  """Σ_k fn(X_k, Y_k): unrolled, or in a loop that holds one block at a time (XLA:CPU
  materialises every unrolled block at once). The loop starts from block 0's value: a
  start of zeros depends on nothing, and XLA may form it in the forward pass and keep
  it until the backward pass needs it."""
  first = fn(*blocks.pair(0))
  if not loop or blocks.count == 1:
    return sum((fn(*blocks.pair(k)) for k in range(1, blocks.count)), start=first)
  return lax.fori_loop(1, blocks.count, lambda k, acc: acc + fn(*blocks.pair(k)), first)


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


def _taps_of_uses(uses, leaf_shape, factor: float, jaxpr: compat.Jaxpr) -> dict[Path, Tap] | None:
  """The taps covering one leaf from its uses ``[(path, eqn, leaf_at)]`` in trace order,
  or None (per-example copies): one tappable use, or a row lookup followed by one
  product on the same table (a tied embedding and output head) inside the same
  checkpoint and scan body."""
  made = [(path, _make_tap(eqn, leaf_at, factor)) for path, eqn, leaf_at in uses]
  if any(tap is None for _, tap in made) or len(made) > 2:
    return None
  if len({_trace_scope(jaxpr, path) for path, _ in made}) > 1:
    return None
  if len(made) == 1:
    return dict(made)
  (lookup_path, lookup), (product_path, product) = made
  # The lookup must read the table itself (no transpose on the way), so that its rows are
  # the table's: _table_rows_axis finds them in the product's kernel.
  rows_on = _table_rows_axis(product, leaf_shape) if lookup.kind == compat.GATHER and not lookup.kernel.layout else None
  if rows_on is None or product.kind != compat.DOT:
    return None
  return {lookup_path: lookup, product_path: product._replace(tied_lookup=(lookup_path, rows_on))}


def _table_rows_axis(tap: Tap, table_shape: tuple[int, ...]) -> str | None:
  """Which axis of a dot product's kernel blocks (1, 1, C, F) runs over the rows of
  the (rows, D) table it reads ("F": ``h @ E.T``, "C": ``x @ E``), the other over
  its D columns in order; None when the kernel is laid out otherwise."""
  if tap.kind != compat.DOT or len(table_shape) != 2:
    return None
  with jax.ensure_compile_time_eval():
    row, col = (jnp.broadcast_to(jnp.arange(n).reshape(shape), table_shape)
                for n, shape in ((table_shape[0], (-1, 1)), (table_shape[1], (1, -1))))
    for eqn in tap.kernel.layout:
      row, col = _bind(eqn, [row])[0], _bind(eqn, [col])[0]
    row, col = _kernel_blocks(tap, row), _kernel_blocks(tap, col)
    if row.shape[:2] != (1, 1):
      return None
    c, f = jnp.arange(row.shape[2])[:, None], jnp.arange(row.shape[3])[None, :]
    if bool(jnp.all(row[0, 0] == f) & jnp.all(col[0, 0] == c)):
      return "F"
    if bool(jnp.all(row[0, 0] == c) & jnp.all(col[0, 0] == f)):
      return "C"
  return None


def gram_factor(backend: str | None = None) -> float:
  """ρ of the cost model on ``backend`` (default: JAX's default backend)."""
  return GRAM_COST_FACTOR.get(backend or jax.default_backend(), 4.0)


def _gram_ratio(sizes: tuple[int, int, int], factor: float) -> float:
  rows, inputs, outputs = sizes
  return factor * rows * (inputs + outputs) / (inputs * outputs)


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


def _choose_form(kind: str, sizes: tuple[int, int, int], kernel_size: int, factor: float) -> str:
  """Gram matrices cost ~ρ·T²·(C+F) per example, the product T·C·F (lookups: T²·D
  against a per-example table of ``kernel_size`` entries)."""
  rows, _, width = sizes
  if kind == compat.GATHER:
    return "gram" if rows**2 * width <= kernel_size else "product"
  return "gram" if _gram_ratio(sizes, factor) <= 1.0 else "product"


# --------------------------------------------------------------------------- norms


def _lookup_gram_sq_norms(num_rows: int, ids: jax.Array, y: jax.Array) -> jax.Array:
  """(Σ_{t,s} [id_t = id_s] <ȳ_t, ȳ_s>)_i for ids (B, T) (num_rows: no row), y (B, T, D)."""
  same = (ids[:, :, None] == ids[:, None, :]) & (ids < num_rows)[:, :, None]
  gram_y = jnp.einsum("btd,bsd->bts", y, y, preferred_element_type=jnp.float32)
  return jnp.sum(jnp.where(same, gram_y, 0.0), axis=(1, 2))


def _kernel_blocks(tap: Tap, kernel: jax.Array) -> jax.Array:
  """The kernel rearranged like the product form's per-example blocks, (K, G, C, F).

  Convolutions: K kernel offsets (in :func:`_conv_blocks`' order), G feature
  groups, C input and F output channels per group. Dot products: K = 1, and G, C, F
  the flattened batch, contracting and free axes of the kernel operand.
  """
  if tap.kind == compat.CONV:
    _, rhs_spec, _ = compat.param(tap.eqn, "dimension_numbers")
    groups = compat.param(tap.eqn, "feature_group_count")
    w = kernel.transpose(*rhs_spec[2:], rhs_spec[0], rhs_spec[1])  # (*window, O, I)
    w = w.reshape(-1, groups, w.shape[-2] // groups, w.shape[-1])  # (K, G, F, C)
    return w.transpose(0, 1, 3, 2)
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = compat.param(tap.eqn, "dimension_numbers")
  contract = (lhs_contract, rhs_contract)[tap.kernel_pos]
  batch = (lhs_batch, rhs_batch)[tap.kernel_pos]
  free = [d for d in range(kernel.ndim) if d not in contract and d not in batch]
  size = lambda dims: math.prod(kernel.shape[d] for d in dims)
  w = kernel.transpose(*batch, *contract, *free)
  return w.reshape(1, size(batch), size(contract), size(free))


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
  chunk = tap.chunk

  def layers(activations, kernel):
    return jax.vmap(lambda a: _layer(tap, a, kernel))(activations)

  def as_kernel(kernel, blocks_kgcf):
    return _transpose(lambda k: _kernel_blocks(tap, k).astype(jnp.float32), kernel, blocks_kgcf)

  def gradients(activations, y_bars):  # each block's (B, G, C, F) example gradients
    blocks = _BLOCKS[tap.kind](tap.eqn, tap.kernel_pos, activations, y_bars)
    return _block_gradients(blocks)

  def sums_and_norms(gs):
    return [g.sum(0) for g in gs], sum(jnp.sum(g * g, axis=(1, 2, 3)) for g in gs)

  def in_chunks(activations, y_bars):
    batch = activations.shape[0]
    count = -(-batch // chunk)
    # Zero rows pad the last chunk: their gradients are zero and add nothing.
    pad = lambda z: jnp.pad(z, [(0, count * chunk - batch)] + [(0, 0)] * (z.ndim - 1))
    xs, ys = pad(activations), pad(y_bars)
    at = lambda i: [lax.dynamic_slice_in_dim(z, i * chunk, chunk) for z in (xs, ys)]
    # The loop starts from chunk 0's sums (a start of zeros could be formed early and kept).
    sums, sq = sums_and_norms(gradients(*at(0)))
    sq_norms = jnp.zeros((count, chunk), jnp.float32).at[0].set(sq)

    def body(i, carry):
      sums, sq_norms = carry
      more, sq = sums_and_norms(gradients(*at(i)))
      return [s + m for s, m in zip(sums, more)], sq_norms.at[i].set(sq)

    sums, sq_norms = lax.fori_loop(1, count, body, (sums, sq_norms))
    return sums, sq_norms.reshape(-1)[:batch]

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
    if chunk is None:
      gs = gradients(activations, y_bars)
      sums, sq_norms = sums_and_norms(gs)
      if linked:
        link = jax.vmap(lambda *blocks: as_kernel(kernel, jnp.stack(blocks)))(*gs)
    else:
      sums, sq_norms = in_chunks(activations, y_bars)
      if linked:
        link = (real(y_bars), activations)
    return a_bars, as_kernel(kernel, jnp.stack(sums)), real(sq_norms), link, None

  batch_layer.defvjp(forward, backward)

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


def _tapped_layer(tap: Tap, loop: bool, linked: bool):
  """``(activation, kernel, probe, link, real) -> output`` of one example's equation, with
  the tap's backward pass (``linked``: it fills ``link`` for :func:`_inner_product_tap`)."""
  if tap.form == "product":
    return _table_tap(tap, linked) if tap.kind == compat.GATHER else _product_tap(tap, linked)
  norm = _norm_tap(tap, loop, linked)
  return lambda activation, kernel, *rest: norm(_layer(tap, activation, kernel), activation, *rest)


def _own_copy(real: jax.Array, x: jax.Array) -> jax.Array:
  """``x`` as this example's own value: under vmap batched even when ``x`` is a constant
  (position ids, a fixed input), so the layer's output and cotangent are per example
  rather than one for the batch with the cotangent summed over it (XLA folds the select)."""
  return jnp.where(real, x, x)


def _per_example_sums(per_example: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(||g_i||²)_i and Σ_i g_i from a leaf's per-example gradients (B, *shape), float32."""
  rows = per_example.astype(jnp.float32).reshape(per_example.shape[0], -1)
  return jnp.sum(rows**2, axis=1), jnp.sum(rows, axis=0).reshape(per_example.shape[1:])


# --------------------------------------------------------------------------- public entry points


def _example_spec(batch: PyTree) -> list[jax.ShapeDtypeStruct]:
  return [jax.ShapeDtypeStruct((1, *jnp.shape(x)[1:]), jnp.result_type(x)) for x in jax.tree.leaves(batch)]


def trace_plan(loss_fn, params: PyTree, batch: PyTree, *, backend: str | None = None) -> GhostPlan:
  """Traces ``loss_fn`` on one example of ``batch`` and decides how to cover each leaf.

  A leaf is tapped when it is read by exactly one equation and that equation is a
  ``dot_general`` (either operand the leaf, the other not a leaf), a
  ``conv_general_dilated`` with the leaf as kernel and ``batch_group_count == 1``,
  or a row ``gather`` from the leaf as table; its form follows the cost model for
  ``backend`` (default: JAX's default backend). Unread leaves need nothing; every
  other leaf gets per-example gradients from broadcast copies ("elementwise" when
  only elementwise arithmetic reads it).
  """
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = [leaf for _, leaf in leaves_with_paths]
  batch_treedef = jax.tree.structure(batch)

  def one_example(leaf_values, example_leaves):
    losses = loss_fn(treedef.unflatten(leaf_values), batch_treedef.unflatten(example_leaves))
    if jnp.shape(losses) != (1,):
      raise ValueError(
          f"loss_fn must return per-example losses of shape (B,); on one example it returned "
          f"shape {jnp.shape(losses)}."
      )
    return losses

  leaf_spec = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves]
  closed = jax.make_jaxpr(one_example)(leaf_spec, _example_spec(batch))
  reads: dict[int, list[tuple[Path, compat.JaxprEqn, dict[int, int]]]] = {}

  def record(path, eqn, invals, leaf_at):
    for view in leaf_at.values():
      reads.setdefault(view.leaf, []).append((path, eqn, leaf_at))

  def walk_all(*args):
    leaf_of = {v: LeafView(i) for i, v in enumerate(closed.jaxpr.invars[: len(leaves)])}
    return _walk(closed.jaxpr, closed.consts, args, leaf_of, (), record)

  jax.eval_shape(walk_all, *closed.in_avals)
  backend = backend or jax.default_backend()
  factor = gram_factor(backend)
  taps, per_example, elementwise = {}, [], []
  for leaf, uses in sorted(reads.items()):
    leaf_taps = _taps_of_uses(uses, jnp.shape(leaves[leaf]), factor, closed.jaxpr)
    if leaf_taps is None:
      per_example.append(leaf)
      if all(compat.primitive_name(use) in _ELEMENTWISE for _, use, _ in uses):
        elementwise.append(leaf)
    else:
      taps.update(leaf_taps)
  names = tuple(jax.tree_util.keystr(p) for p, _ in leaves_with_paths)
  sizes = tuple(math.prod(jnp.shape(x)) for x in leaves)
  opaque = _opaque_reads({leaf: reads[leaf] for leaf in per_example}, names)
  return GhostPlan(
      closed, taps, tuple(per_example), tuple(elementwise), names, sizes, factor, backend == "cpu", opaque
  )


_WARNED_PRIMITIVES: set[str] = set()


def _opaque_reads(fallback_uses: dict, names: tuple[str, ...]) -> tuple[tuple[int, tuple[str, ...]], ...]:
  """``(leaf, primitive names)`` of the fallback leaves read by a higher-order primitive
  the walker does not know, with a warning once per primitive (per process): such a
  leaf's norm is exact but costs B copies of it, and a new primitive may be one the
  taps should learn."""
  known = compat.CALL_PRIMITIVES | compat.CHECKPOINT_PRIMITIVES | {compat.SCAN}
  opaque = []
  for leaf, uses in sorted(fallback_uses.items()):
    primitives = sorted({compat.primitive_name(e) for _, e, _ in uses if compat.primitive_name(e) not in known and compat.is_higher_order(e)})
    if primitives:
      opaque.append((leaf, tuple(primitives)))
  for primitive in sorted({p for _, ps in opaque for p in ps} - _WARNED_PRIMITIVES):
    _WARNED_PRIMITIVES.add(primitive)
    leaves = [names[leaf] for leaf, ps in opaque if primitive in ps]
    warnings.warn(
        f"divebatch_jax.stats.taps: parameter leaves {', '.join(leaves)} enter {primitive!r}, a higher-order "
        f"primitive the taps do not walk; their per-example norms come from per-example copies (exact, "
        f"B copies of each leaf: 'per-example fallback' in GhostPlan.describe()). Said once per primitive.",
        stacklevel=3,
    )
  return tuple(opaque)


class GhostSums(NamedTuple):
  """What :func:`ghost_sums` returns, over the real rows of one batch (float32).

  loss_sum: Σ_i loss_i; sum_g: Σ_i g_i, shaped like the parameters;
  sq_norms: (||g_i||²)_i, zero on padded rows; inner_products: (<g_i, d>)_i for
  the ``direction`` d given to :func:`ghost_sums`, or (<g_i, ḡ>)_i with
  ``about_mean`` (ḡ = sum_g / the real count), zero on padded rows; None without either.
  """

  loss_sum: jax.Array
  sum_g: PyTree
  sq_norms: jax.Array
  inner_products: jax.Array | None = None


def _with_chunks(plan: GhostPlan, batch: int, linked: bool) -> dict[Path, Tap]:
  """The plan's taps, product layers given their chunk of a loop over ``batch`` examples."""
  def chunked(tap):
    if tap.form != "product" or tap.kind == compat.GATHER:
      return tap
    size = math.prod(tap.eqn.invars[tap.kernel_pos].aval.shape)
    return tap._replace(chunk=_chunk_size(batch, size, plan.loop_blocks, linked))

  return {path: chunked(tap) for path, tap in plan.taps.items()}


def _example_loss(plan: GhostPlan, directions: list, with_ip: bool, batch: int):
  """The loss of one example re-evaluated from ``plan`` with every tap in place:
  ``(shared, copies, probes, ip_probes, example, real, count) -> loss``, to be vmapped
  (``count``, the batch's real rows, and ``shared`` leaves unbatched).

  ``with_ip``: each tapped kernel passes through :func:`_inner_product_tap` (a tied
  table's once, at its lookup, for both uses), whose ``ip_probes`` cotangent is <g_i, v>.
  """
  plan_taps = _with_chunks(plan, batch, with_ip)
  layers = {path: _tapped_layer(tap, plan.loop_blocks, with_ip) for path, tap in plan_taps.items()}
  # A tied lookup's cross term 2<g_lookup, g_product> has a probe of its own, at path + (-1,).
  tied = {t.tied_lookup[0]: t for t in plan_taps.values() if t.tied_lookup is not None}
  links = {path: _lookup_link(plan_taps[path]) for path in tied}
  links.update({path: _product_link(t, plan_taps[t.tied_lookup[0]]) for path, t in plan_taps.items() if t.tied_lookup})
  kernels_in = {
      path: _inner_product_tap(tap, tied.get(path)) for path, tap in plan_taps.items() if with_ip and not tap.tied_lookup
  }
  leaf_of = {v: LeafView(i, (), directions[i]) for i, v in enumerate(plan.jaxpr.jaxpr.invars[: len(directions)])}

  def one_example(shared, copies, probes, ip_probes, example, real, count):
    looked_up = {}  # a tied lookup's path -> (row ids, the link its product fills)
    tied_operands = {}  # a tied lookup's path -> its product's (kernel, link), with_ip

    def tap_layer(path, eqn, invals, leaf_at):
      tap = plan_taps.get(path)
      if tap is None:
        return None
      activation, kernel, link = _own_copy(real, invals[1 - tap.kernel_pos]), invals[tap.kernel_pos], None
      if path in kernels_in:
        ids = activation if tap.kind == compat.GATHER else None
        direction = leaf_at[tap.kernel_pos].direction
        kernels, ip_links = kernels_in[path](kernel, ids, direction, count, ip_probes[path], real)
        kernel, link = kernels[0], ip_links[0]
        if path in tied:
          tied_operands[path] = (kernels[1], ip_links[1])
      elif with_ip:  # a tied product: the table and link its lookup's identity laid out
        kernel, link = tied_operands[tap.tied_lookup[0]]
      out = layers[path](activation, kernel, probes[path], link, real)
      if path in tied:
        out, looked_up[path] = links[path](out, activation, probes[path + (-1,)], real)
      elif tap.tied_lookup is not None:
        out = links[path](out, activation, *looked_up[tap.tied_lookup[0]])
      return [out]

    args = [copies[i] if i in copies else x for i, x in enumerate(shared)] + list(example)
    (losses,) = _walk(plan.jaxpr.jaxpr, plan.jaxpr.consts, args, dict(leaf_of), (), tap_layer)
    return losses[0]

  return one_example


def _copied_leaf_sums(rows: jax.Array, direction: jax.Array | None, count: jax.Array | None):
  """(||g_i||²)_i, Σ_i g_i and (<g_i, v>)_i of a leaf with per-example gradients ``rows``
  (B, *shape), zero on padded rows: v = ``direction``, or ḡ = Σ_i g_i / ``count`` where a
  count is given; None without either."""
  sq_norms, sum_g = _per_example_sums(rows)
  v = direction if count is None else sum_g / jnp.maximum(count, 1.0)
  if v is None:
    return sq_norms, sum_g, None
  flat = rows.astype(jnp.float32).reshape(rows.shape[0], -1)
  return sq_norms, sum_g, flat @ jnp.ravel(v).astype(jnp.float32)


def ghost_sums(
    loss_fn, params: PyTree, batch: PyTree, mask: jax.Array, *, direction: PyTree | None = None,
    about_mean: bool = False,
) -> GhostSums:
  """Per-example squared gradient norms and the summed gradient in one backward pass.

  ``mask`` is a bool (B,) array; padded rows add nothing (their inputs are replaced
  by zeros first, so garbage there cannot reach a sum). Each tapped layer adds its
  examples' squared norms to a per-example probe during the backward pass, when its
  output cotangent is at hand, so no cotangent outlives its layer.

  The same pass gives <g_i, v> per example, v = a ``direction`` d (shaped like
  ``params``: the previous step's mean gradient, say) or, ``about_mean``, the
  batch's own mean ḡ over the real rows. Each tapped layer adds its term once its
  backward pass has formed the summed kernel gradient S (so ḡ = S / count there):
  <G_i, v> from the example gradient G_i (product form, C·F per example) or
  <Ȳ_i, layer(X_i, v)> (Gram form and lookups: one more forward product of the
  layer); a tied table adds both uses' terms about its whole ḡ at its lookup; leaves
  with per-example copies add <g_i, v> from their (B, ...) gradients.
  """
  if direction is not None and about_mean:
    raise ValueError("ghost_sums takes direction= (a given d) or about_mean=True (the batch's ḡ), not both.")
  plan = trace_plan(loss_fn, params, batch)
  leaves, treedef = jax.tree.flatten(params)
  with_ip = about_mean or direction is not None
  directions = [None] * len(leaves) if direction is None else [jnp.asarray(d, jnp.float32) for d in jax.tree.leaves(direction)]
  b = mask.shape[0]
  zeros = lambda: jnp.zeros((b,), jnp.float32)
  copies = {i: jnp.broadcast_to(leaves[i], (b, *jnp.shape(leaves[i]))) for i in plan.per_example_leaves}
  shared = [None if i in copies else x for i, x in enumerate(leaves)]
  cross = [t.tied_lookup[0] + (-1,) for t in plan.taps.values() if t.tied_lookup is not None]
  probes = {path: zeros() for path in [*plan.taps, *cross]}
  ip_probes = {path: zeros() for path, t in plan.taps.items() if with_ip and t.tied_lookup is None}
  example_leaves = [_masked(mask.reshape((b,) + (1,) * (x.ndim - 1)), x)[:, None] for x in jax.tree.leaves(batch)]
  count = jnp.sum(mask).astype(jnp.float32)
  one_example = jax.vmap(
      _example_loss(plan, directions, with_ip, b), in_axes=(None, 0, 0, 0, 0, 0, None), axis_name=EXAMPLE_AXIS
  )

  def masked_sum(shared, copies, probes, ip_probes):
    losses = one_example(shared, copies, probes, ip_probes, example_leaves, mask, count)
    return jnp.sum(jnp.where(mask, losses, 0.0)).astype(jnp.float32)

  loss_sum, (g_shared, g_copies, g_probes, g_ip) = jax.value_and_grad(masked_sum, argnums=(0, 1, 2, 3))(
      shared, copies, probes, ip_probes
  )
  sum_g = [None if g is None else g.astype(jnp.float32) for g in g_shared]
  sq_norms = sum(g_probes.values(), start=zeros())
  inner = sum(g_ip.values(), start=zeros()) if with_ip else None
  for i, g in g_copies.items():
    rows = _masked(mask.reshape((b,) + (1,) * (g.ndim - 1)), g)
    leaf_sq, sum_g[i], leaf_ip = _copied_leaf_sums(rows, directions[i], count if about_mean else None)
    sq_norms = sq_norms + leaf_sq
    inner = None if leaf_ip is None else inner + leaf_ip
  inner = None if inner is None else _masked(mask, inner)
  return GhostSums(loss_sum, treedef.unflatten(sum_g), _masked(mask, sq_norms), inner)
