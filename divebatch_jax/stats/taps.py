"""Ghost norms: per-example squared gradient norms without per-example gradients.

A layer that multiplies the T rows of example i (pixels, tokens; T = 1 for a plain
dense layer) by a kernel W has the per-example kernel gradient g_i = X_iᵀ Ȳ_i, with
X_i (T×C) the layer input and Ȳ_i (T×F) the cotangent of its output, so

    ||g_i||² = ||X_iᵀ Ȳ_i||²           "outer": form g_i, T·C·F work and C·F memory
             = <X_i X_iᵀ, Ȳ_i Ȳ_iᵀ>    "gram":  T²·(C+F) work, T² memory; for T = 1
                                        it is the rank-1 form ||x_i||²·||ȳ_i||²

and each layer takes the cheaper form for its shapes. A convolution is the same
product with X_i its input patches: the Gram form sums X_k X_kᵀ over the kernel
offsets k (any strides, padding, dilations, feature groups); the outer form runs
the convolution's own transpose once per example. An embedding lookup
y_t = E[id_t] has ||g_i||² = Σ_{t,s} [id_t = id_s] <ȳ_t, ȳ_s> ("gram", T²·D) or
the norm of the rows scattered into a table ("outer", the table's size).

:func:`trace_plan` traces the per-example loss to a jaxpr and finds every
``dot_general`` / ``conv_general_dilated`` whose kernel operand, and every row
``gather`` whose table, is a parameter leaf used there and nowhere else (through
casts, reshapes, transposes and nested ``jit`` calls). :func:`ghost_sums` then
re-evaluates that jaxpr, vmapped over the batch, adding a zero perturbation to the
output of each tapped layer: one backward pass gives the summed parameter gradient
and, as the perturbations' gradients, each layer's output cotangents Ȳ_i. Every
other leaf (biases, norm scales, weights used twice, leaves inside scans or custom
derivative rules) gets its exact per-example gradient in the same pass, from B
broadcast copies of that leaf alone. So flax nnx, linen and plain-JAX losses work
unchanged. Only :mod:`divebatch_jax.stats` uses this module.

Example::

    import jax, jax.numpy as jnp
    from divebatch_jax.stats import taps

    def loss_fn(p, batch):
      return jnp.sum((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2, axis=-1)

    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    batch = {"x": jnp.ones((5, 3)), "y": jnp.zeros((5, 2))}
    plan = taps.trace_plan(loss_fn, params, batch)
    print(plan.describe())                  # w: dot_general (gram), b: per-example
    sums = taps.ghost_sums(loss_fn, params, batch, jnp.ones(5, bool))  # sq_norms, dots, ...
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex

PyTree = Any
Path = tuple[int, ...]  # index of an equation at each level of nested jaxprs

# One-input primitives whose output holds exactly the elements of their input: a
# gradient through them keeps its norm, so their output still counts as the leaf.
_ELEMENT_PRESERVING = frozenset(
    {"convert_element_type", "copy", "copy_p", "reshape", "transpose", "squeeze"}
)
# Call primitives whose body is walked in place when a parameter enters them.
_INLINED_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "checkpoint", "remat"})
# Gather modes for which the row a lookup reads is known (PROMISE_IN_BOUNDS clamps).
_CLAMPED_LOOKUPS = (lax.GatherScatterMode.CLIP, lax.GatherScatterMode.PROMISE_IN_BOUNDS)


class LeafView(NamedTuple):
  """A variable holding parameter leaf ``leaf`` after the reshapes/transposes ``layout``."""

  leaf: int  # index of the parameter leaf in jax.tree.leaves(params)
  layout: tuple[jex.JaxprEqn, ...] = ()


class Tap(NamedTuple):
  """One tapped layer: the equation, which operand is the parameter, the form used."""

  kind: str  # "dot_general" | "conv_general_dilated" | "gather"
  kernel: LeafView
  kernel_pos: int  # operand position of the leaf in the equation
  eqn: jex.JaxprEqn
  form: str  # "outer" | "gram"


class GhostPlan(NamedTuple):
  """How :func:`ghost_sums` covers each parameter leaf of one loss at one batch shape.

  Attributes:
    jaxpr: the loss of one example (batch axis of size 1), traced.
    taps: the tapped layers by equation path.
    per_example_leaves: leaves given exact per-example gradients instead.
    leaf_names: ``jax.tree_util.keystr`` of each leaf, for :meth:`describe`.
    leaf_sizes: number of entries of each leaf.
  """

  jaxpr: jex.ClosedJaxpr
  taps: dict[Path, Tap]
  per_example_leaves: tuple[int, ...]
  leaf_names: tuple[str, ...]
  leaf_sizes: tuple[int, ...]

  def per_example_share(self) -> float:
    """Share of the parameter entries whose per-example gradients are formed anyway
    (leaves in the outer form or not tapped); 1.0 for no parameters."""
    formed = set(self.per_example_leaves) | {t.kernel.leaf for t in self.taps.values() if t.form == "outer"}
    total = sum(self.leaf_sizes)
    return sum(self.leaf_sizes[i] for i in formed) / total if total else 1.0

  def describe(self) -> dict[str, str]:
    """``{leaf name: how its per-example norm is computed}`` for every leaf."""
    how = {i: "unused" for i in range(len(self.leaf_names))}
    how.update({i: "per-example" for i in self.per_example_leaves})
    how.update({t.kernel.leaf: f"{t.kind} ({t.form})" for t in self.taps.values()})
    return {self.leaf_names[i]: how[i] for i in sorted(how)}


# --------------------------------------------------------------------------- walking a jaxpr

# visit(path, eqn, invals, leaf_at) is called for every equation that reads a parameter
# leaf (leaf_at: operand position -> LeafView) and is neither walked into nor
# element-preserving; it returns the equation's outputs, or None to evaluate it as is.
Visit = Callable[[Path, jex.JaxprEqn, list, dict[int, LeafView]], "list | None"]


def _bind(eqn: jex.JaxprEqn, invals: list) -> list:
  out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
  return list(out) if eqn.primitive.multiple_results else [out]


def _inlined_body(eqn: jex.JaxprEqn) -> jex.ClosedJaxpr | None:
  if eqn.primitive.name not in _INLINED_CALLS:
    return None
  body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  if isinstance(body, jex.Jaxpr):
    return jex.ClosedJaxpr(body, ())
  return body if isinstance(body, jex.ClosedJaxpr) else None


def _walk(jaxpr: jex.Jaxpr, consts, args, leaf_of: dict, path: Path, visit: Visit) -> list:
  """Evaluates ``jaxpr`` like ``jax.core.eval_jaxpr``, tracking which variables are leaves."""
  env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))

  def read(v):
    return v.val if isinstance(v, jex.Literal) else env[v]

  def leaf_view(v):
    return None if isinstance(v, jex.Literal) else leaf_of.get(v)

  for index, eqn in enumerate(jaxpr.eqns):
    here = path + (index,)
    invals = [read(v) for v in eqn.invars]
    leaf_at = {p: leaf_view(v) for p, v in enumerate(eqn.invars) if leaf_view(v) is not None}
    body = _inlined_body(eqn) if leaf_at else None
    if body is not None:
      inner = {body.jaxpr.invars[p]: leaf for p, leaf in leaf_at.items()}
      outs = _walk(body.jaxpr, body.consts, invals, inner, here, visit)
      for outer_v, inner_v in zip(eqn.outvars, body.jaxpr.outvars):
        if not isinstance(inner_v, jex.Literal) and inner_v in inner:
          leaf_of[outer_v] = inner[inner_v]
    elif leaf_at and eqn.primitive.name in _ELEMENT_PRESERVING and len(eqn.invars) == 1:
      outs = _bind(eqn, invals)
      view = leaf_at[0]
      if eqn.primitive.name != "convert_element_type":  # gradients stay float32
        view = view._replace(layout=view.layout + (eqn,))
      leaf_of[eqn.outvars[0]] = view
    else:
      outs = (visit(here, eqn, invals, leaf_at) if leaf_at else None) or _bind(eqn, invals)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


# --------------------------------------------------------------------------- Gram operands
# For one example, a product layer's Gram operands are blocks X_k (G, T, C_k) of its
# input and Y (G, T, F) of its output cotangent, such that the kernel gradient is made
# of the blocks X_kᵀ Y. A lookup's are row ids (T,) and cotangents (T, D).


def _dot_operands(eqn, kernel_pos, activation, cotangent):
  """One block: the activation as (G, T, C), the cotangent as (G, T, F)."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
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
  return [x], cotangent.reshape(groups, rows, -1)


def _conv_operands(eqn, kernel_pos, activation, cotangent):
  """One block per kernel offset: the input pixels it meets, (G, T, C/G); cotangent (G, T, F/G)."""
  del kernel_pos  # always the rhs
  prm = eqn.params
  lhs_spec, rhs_spec, out_spec = prm["dimension_numbers"]
  groups = prm["feature_group_count"]
  window = [eqn.invars[1].aval.shape[d] for d in rhs_spec[2:]]
  out_size = [cotangent.shape[d] for d in out_spec[2:]]
  x = activation.transpose(lhs_spec[0], *lhs_spec[2:], lhs_spec[1])  # (N, *spatial, C)
  pads = [(lo, hi, dilation - 1) for (lo, hi), dilation in zip(prm["padding"], prm["lhs_dilation"])]
  x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *pads, (0, 0, 0)])
  rows = x.shape[0] * math.prod(out_size)
  blocks = []
  for offset in itertools.product(*map(range, window)):
    start = [k * d for k, d in zip(offset, prm["rhs_dilation"])]
    limit = [s + (n - 1) * stride + 1 for s, n, stride in zip(start, out_size, prm["window_strides"])]
    pixels = lax.slice(
        x, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]), (1, *prm["window_strides"], 1)
    )
    blocks.append(pixels.reshape(rows, groups, -1).transpose(1, 0, 2))
  y = cotangent.transpose(out_spec[0], *out_spec[2:], out_spec[1]).reshape(rows, groups, -1)
  return blocks, y.transpose(1, 0, 2)


def _lookup_operands(eqn, kernel_pos, indices, cotangent):
  """(T,) row ids (the row count where a lookup reads nothing) and (T, D) cotangents."""
  del kernel_pos  # always the table
  num_rows = eqn.invars[0].aval.shape[0]
  offset_dims = eqn.params["dimension_numbers"].offset_dims
  row_dims = [d for d in range(cotangent.ndim) if d not in offset_dims]
  rows = math.prod(cotangent.shape[d] for d in row_dims)
  y = cotangent.transpose(*row_dims, *offset_dims).reshape(rows, -1)
  ids = indices[..., 0].reshape(rows)
  if eqn.params["mode"] in _CLAMPED_LOOKUPS:
    return jnp.clip(ids, 0, num_rows - 1), y
  return jnp.where((ids >= 0) & (ids < num_rows), ids, num_rows), y  # FILL_OR_DROP


_OPERANDS = {
    "dot_general": _dot_operands,
    "conv_general_dilated": _conv_operands,
    "gather": _lookup_operands,
}


def _is_row_lookup(eqn) -> bool:
  dims = eqn.params["dimension_numbers"]
  table = eqn.invars[0].aval.shape
  return (
      dims.collapsed_slice_dims == (0,)
      and dims.start_index_map == (0,)
      and not dims.operand_batching_dims
      and tuple(eqn.params["slice_sizes"]) == (1, *table[1:])
      and eqn.invars[1].aval.shape[-1] == 1
      and eqn.params["mode"] in (*_CLAMPED_LOOKUPS, lax.GatherScatterMode.FILL_OR_DROP)
  )


def _tappable(eqn, leaf_at: dict[int, LeafView]) -> int | None:
  """The operand position of the one leaf if ``eqn`` is a layer this module can tap."""
  if len(leaf_at) != 1:
    return None
  (pos,) = leaf_at
  name = eqn.primitive.name
  if name == "dot_general":
    return pos
  if name == "conv_general_dilated" and pos == 1 and eqn.params["batch_group_count"] == 1:
    return pos
  if name == "gather" and pos == 0 and _is_row_lookup(eqn):
    return pos
  return None


def _cheaper_form(kind: str, operands, kernel_size: int) -> str:
  """Per example, Gram matrices cost T²·(C+F) (T²·D for lookups); the per-example
  gradient T·C·F (a table of kernel_size entries for lookups)."""
  if kind == "gather":
    ids, y = operands
    return "gram" if ids.shape[0] ** 2 * y.shape[-1] <= kernel_size else "outer"
  xs, y = operands
  _, t, f = y.shape
  c = sum(x.shape[-1] for x in xs)
  return "gram" if t * (c + f) <= c * f else "outer"


# --------------------------------------------------------------------------- norms


def _product_gram_sq_norms(xs: list[jax.Array], y: jax.Array) -> jax.Array:
  """(Σ_g <Σ_k X_k X_kᵀ, Y Yᵀ>)_i for xs (B, G, T, C_k), y (B, G, T, F)."""
  f32 = dict(preferred_element_type=jnp.float32)
  gram_x = sum(jnp.einsum("bgtc,bgsc->bgts", x, x, **f32) for x in xs)
  return jnp.sum(gram_x * jnp.einsum("bgtf,bgsf->bgts", y, y, **f32), axis=(1, 2, 3))


def _product_pair_grams(xs: list[jax.Array], y: jax.Array) -> jax.Array:
  """(<g_i, g_j>)_{ij} = (Σ_g <Σ_k X_ik X_jkᵀ, Y_i Y_jᵀ>)_{ij}, (B, B): the Gram form across examples."""
  f32 = dict(preferred_element_type=jnp.float32)
  gram_x = sum(jnp.einsum("bgtc,dgsc->bdgts", x, x, **f32) for x in xs)
  return jnp.sum(gram_x * jnp.einsum("bgtf,dgsf->bdgts", y, y, **f32), axis=(2, 3, 4))


def _lookup_gram_sq_norms(num_rows: int, ids: jax.Array, y: jax.Array) -> jax.Array:
  """(Σ_{t,s} [id_t = id_s] <ȳ_t, ȳ_s>)_i for ids (B, T) (num_rows: no row), y (B, T, D)."""
  same = (ids[:, :, None] == ids[:, None, :]) & (ids < num_rows)[:, :, None]
  gram_y = jnp.einsum("btd,bsd->bts", y, y, preferred_element_type=jnp.float32)
  return jnp.sum(jnp.where(same, gram_y, 0.0), axis=(1, 2))


class LeafSums(NamedTuple):
  """One leaf's share of the statistics over a batch (float32).

  sq_norms: (||g_i||²)_i; dots: (<g_i, Σ_j g_j>)_i; summed: Σ_j g_j.
  """

  sq_norms: jax.Array
  dots: jax.Array
  summed: jax.Array


def _per_example_sums(per_example: jax.Array) -> LeafSums:
  """LeafSums from a leaf's per-example gradients (B, *shape)."""
  rows = per_example.astype(jnp.float32).reshape(per_example.shape[0], -1)
  summed = jnp.sum(rows, axis=0)
  return LeafSums(jnp.sum(rows**2, axis=1), rows @ summed, summed.reshape(per_example.shape[1:]))


def _tap_contribution(tap: Tap, activations: jax.Array, cotangents: jax.Array) -> LeafSums:
  """One tapped layer's LeafSums (``summed`` in the operand's layout).

  "outer" forms each g_i by the layer's own transpose. "gram" takes Σ_j g_j from
  the transpose of the whole batch and the norms from Gram matrices. It gets
  <g_i, S> either as <Ȳ_i, layer(X_i; S)> (the layer is linear in its kernel: one
  more forward pass of this layer, B·T·C·F work) or, for a product layer where
  (B·T)²·(C+F) is less, from the Gram matrices across examples (<g_i, g_j>)_ij.
  """
  kernel = tap.eqn.invars[tap.kernel_pos].aval
  kernel_spec = jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)

  def layer(activation, k):
    operands = [activation, k] if tap.kernel_pos == 1 else [k, activation]
    return _bind(tap.eqn, operands)[0]

  if tap.form == "outer":

    def gradient(activation, cotangent):
      return jax.linear_transpose(lambda k: layer(activation, k), kernel_spec)(cotangent)[0]

    return _per_example_sums(jax.vmap(gradient)(activations, cotangents))
  batch_layer = jax.vmap(layer, in_axes=(0, None))
  (summed,) = jax.linear_transpose(lambda k: batch_layer(activations, k), kernel_spec)(cotangents)
  xs, y = jax.vmap(lambda a, c: _OPERANDS[tap.kind](tap.eqn, tap.kernel_pos, a, c))(activations, cotangents)
  if tap.kind == "gather":
    sq_norms = _lookup_gram_sq_norms(kernel.shape[0], xs, y)
  else:
    sq_norms = _product_gram_sq_norms(xs, y)
    b, _, t, f = y.shape
    c = sum(x.shape[-1] for x in xs)
    if b * t * (c + f) < c * f:
      dots = jnp.sum(_product_pair_grams(xs, y), axis=1)
      return LeafSums(sq_norms, dots, summed.astype(jnp.float32))
  replayed = batch_layer(activations, summed).astype(jnp.float32)
  dots = jnp.sum((replayed * cotangents.astype(jnp.float32)).reshape(len(replayed), -1), axis=1)
  return LeafSums(sq_norms, dots, summed.astype(jnp.float32))


def _undo_layout(view: LeafView, leaf_shape, operand_grad: jax.Array) -> jax.Array:
  """The leaf's gradient from its reshaped/transposed operand's (a linear transpose)."""
  if not view.layout:
    return operand_grad

  def layout(x):
    for eqn in view.layout:
      (x,) = _bind(eqn, [x])
    return x

  (grad,) = jax.linear_transpose(layout, jax.ShapeDtypeStruct(leaf_shape, jnp.float32))(operand_grad)
  return grad


# --------------------------------------------------------------------------- public entry points


def _example_spec(batch: PyTree) -> list[jax.ShapeDtypeStruct]:
  return [jax.ShapeDtypeStruct((1, *jnp.shape(x)[1:]), jnp.result_type(x)) for x in jax.tree.leaves(batch)]


def trace_plan(loss_fn, params: PyTree, batch: PyTree) -> GhostPlan:
  """Traces ``loss_fn`` on one example of ``batch`` and decides how to cover each leaf.

  A leaf is tapped when it is read by exactly one equation and that equation is a
  ``dot_general`` (either operand the leaf, the other not a leaf), a
  ``conv_general_dilated`` with the leaf as kernel and ``batch_group_count == 1``,
  or a row ``gather`` from the leaf as table. Unread leaves need nothing; every
  other leaf gets exact per-example gradients.
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
  reads: dict[int, list[tuple[Path, jex.JaxprEqn, dict[int, int]]]] = {}

  def record(path, eqn, invals, leaf_at):
    for view in leaf_at.values():
      reads.setdefault(view.leaf, []).append((path, eqn, leaf_at))

  def walk_all(*args):
    leaf_of = {v: LeafView(i) for i, v in enumerate(closed.jaxpr.invars[: len(leaves)])}
    return _walk(closed.jaxpr, closed.consts, args, leaf_of, (), record)

  jax.eval_shape(walk_all, *closed.in_avals)
  taps, per_example = {}, []
  for leaf, uses in sorted(reads.items()):
    pos = _tappable(uses[0][1], uses[0][2]) if len(uses) == 1 else None
    if pos is None:
      per_example.append(leaf)
      continue
    path, eqn, leaf_at = uses[0]
    kind = eqn.primitive.name
    act, out = eqn.invars[1 - pos].aval, eqn.outvars[0].aval
    operands = jax.eval_shape(
        lambda a, o: _OPERANDS[kind](eqn, pos, a, o),
        jax.ShapeDtypeStruct(act.shape, act.dtype),
        jax.ShapeDtypeStruct(out.shape, out.dtype),
    )
    form = _cheaper_form(kind, operands, math.prod(eqn.invars[pos].aval.shape))
    taps[path] = Tap(kind, leaf_at[pos], pos, eqn, form)
  names = tuple(jax.tree_util.keystr(p) for p, _ in leaves_with_paths)
  sizes = tuple(math.prod(jnp.shape(x)) for x in leaves)
  return GhostPlan(closed, taps, tuple(per_example), names, sizes)


class GhostSums(NamedTuple):
  """What :func:`ghost_sums` returns, over the real rows of one batch (float32).

  loss_sum: Σ_i loss_i; sum_g: Σ_i g_i, shaped like the parameters;
  sq_norms: (||g_i||²)_i; dots: (<g_i, sum_g>)_i. Padded rows hold zeros.
  """

  loss_sum: jax.Array
  sum_g: PyTree
  sq_norms: jax.Array
  dots: jax.Array


def ghost_sums(loss_fn, params: PyTree, batch: PyTree, mask: jax.Array) -> GhostSums:
  """Per-example squared norms and inner products with the summed gradient, one backward pass.

  ``mask`` is a bool (B,) array; padded rows add nothing. Tapped leaves are not
  differentiated by autodiff: their summed gradients come from the same layer
  inputs and cotangents as their norms.
  """
  plan = trace_plan(loss_fn, params, batch)
  leaves, treedef = jax.tree.flatten(params)
  b = mask.shape[0]
  copies = {i: jnp.broadcast_to(leaves[i], (b, *jnp.shape(leaves[i]))) for i in plan.per_example_leaves}
  zeros = {
      path: jnp.zeros((b, *tap.eqn.outvars[0].aval.shape), tap.eqn.outvars[0].aval.dtype)
      for path, tap in plan.taps.items()
  }
  example_leaves = [x[:, None] for x in jax.tree.leaves(batch)]  # one example = a batch of 1
  leaf_of = {v: LeafView(i) for i, v in enumerate(plan.jaxpr.jaxpr.invars[: len(leaves)])}

  def one_example(copies, perturbation, example):
    activations = {}

    def tap_layer(path, eqn, invals, leaf_at):
      tap = plan.taps.get(path)
      if tap is None:
        return None
      activations[path] = invals[1 - tap.kernel_pos]
      return [_bind(eqn, invals)[0] + perturbation[path]]

    args = [copies.get(i, x) for i, x in enumerate(leaves)] + list(example)
    (losses,) = _walk(plan.jaxpr.jaxpr, plan.jaxpr.consts, args, dict(leaf_of), (), tap_layer)
    return losses[0], activations

  def masked_sum(copies, perturbation):
    losses, activations = jax.vmap(one_example)(copies, perturbation, example_leaves)
    return jnp.sum(jnp.where(mask, losses, 0.0)).astype(jnp.float32), activations

  (loss_sum, activations), (g_copies, cotangents) = jax.value_and_grad(
      masked_sum, argnums=(0, 1), has_aux=True
  )(copies, zeros)
  sq_norms = dots = jnp.zeros((b,), jnp.float32)
  sum_g = [jnp.zeros(jnp.shape(x), jnp.float32) for x in leaves]  # unused leaves stay zero
  for path, tap in plan.taps.items():
    part = _tap_contribution(tap, activations[path], cotangents[path])
    sum_g[tap.kernel.leaf] = _undo_layout(tap.kernel, jnp.shape(leaves[tap.kernel.leaf]), part.summed)
    sq_norms, dots = sq_norms + part.sq_norms, dots + part.dots
  for i, g in g_copies.items():
    part = _per_example_sums(g)
    sum_g[i] = part.summed
    sq_norms, dots = sq_norms + part.sq_norms, dots + part.dots
  real = lambda x: jnp.where(mask, x, 0.0)
  return GhostSums(loss_sum, treedef.unflatten(sum_g), real(sq_norms), real(dots))
