"""Ghost norms: per-example squared gradient norms without per-example gradients.

A layer that multiplies the T rows of example i (pixels, tokens; T = 1 for a plain
dense layer) by a kernel W has the per-example kernel gradient g_i = X_iᵀ Ȳ_i, with
X_i (T×C) the layer input and Ȳ_i (T×F) the cotangent of its output, so

    ||g_i||² = ||X_iᵀ Ȳ_i||²           "outer": T·C·F work per example
             = <X_i X_iᵀ, Ȳ_i Ȳ_iᵀ>    "gram":  T²·(C+F) work; for T = 1 it is the
                                        rank-1 form ||x_i||²·||ȳ_i||²

and each layer takes the cheaper form for its shapes. A convolution is the same
product with X_i the matrix of its input patches (any strides, padding, dilations,
feature groups). An embedding lookup y_t = E[id_t] has
||g_i||² = Σ_{t,s} [id_t = id_s] <ȳ_t, ȳ_s> ("gram") or the norm of the rows
scattered into a table ("scatter"), whichever is cheaper.

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
    from divebatch_jax import _ghost

    def loss_fn(p, batch):
      return jnp.sum((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2, axis=-1)

    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    batch = {"x": jnp.ones((5, 3)), "y": jnp.zeros((5, 2))}
    plan = _ghost.trace_plan(loss_fn, params, batch)
    print(plan.describe())                  # w: dot_general (gram), b: per-example
    loss_sum, sum_g, sq_norms = _ghost.ghost_sums(loss_fn, params, batch, jnp.ones(5, bool))
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


class Tap(NamedTuple):
  """One tapped layer: the equation, which operand is the parameter, the form used."""

  kind: str  # "dot_general" | "conv_general_dilated" | "gather"
  leaf: int  # index of the parameter leaf in jax.tree.leaves(params)
  kernel_pos: int  # operand position of the leaf in the equation
  eqn: jex.JaxprEqn
  form: str  # "outer" | "gram" (products), "scatter" | "gram" (lookups)


class GhostPlan(NamedTuple):
  """How :func:`ghost_sums` covers each parameter leaf of one loss at one batch shape.

  Attributes:
    jaxpr: the loss of one example (batch axis of size 1), traced.
    taps: the tapped layers by equation path.
    per_example_leaves: leaves given exact per-example gradients instead.
    leaf_names: ``jax.tree_util.keystr`` of each leaf, for :meth:`describe`.
  """

  jaxpr: jex.ClosedJaxpr
  taps: dict[Path, Tap]
  per_example_leaves: tuple[int, ...]
  leaf_names: tuple[str, ...]

  def describe(self) -> dict[str, str]:
    """``{leaf name: how its per-example norm is computed}`` for every leaf."""
    how = {i: "unused" for i in range(len(self.leaf_names))}
    how.update({i: "per-example" for i in self.per_example_leaves})
    how.update({t.leaf: f"{t.kind} ({t.form})" for t in self.taps.values()})
    return {self.leaf_names[i]: how[i] for i in sorted(how)}


# --------------------------------------------------------------------------- walking a jaxpr

# visit(path, eqn, invals, leaf_at) is called for every equation that reads a parameter
# leaf (leaf_at: operand position -> leaf index) and is neither walked into nor
# element-preserving; it returns the equation's outputs, or None to evaluate it as is.
Visit = Callable[[Path, jex.JaxprEqn, list, dict[int, int]], "list | None"]


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

  def leaf_index(v):
    return None if isinstance(v, jex.Literal) else leaf_of.get(v)

  for index, eqn in enumerate(jaxpr.eqns):
    here = path + (index,)
    invals = [read(v) for v in eqn.invars]
    leaf_at = {p: leaf_index(v) for p, v in enumerate(eqn.invars) if leaf_index(v) is not None}
    body = _inlined_body(eqn) if leaf_at else None
    if body is not None:
      inner = {body.jaxpr.invars[p]: leaf for p, leaf in leaf_at.items()}
      outs = _walk(body.jaxpr, body.consts, invals, inner, here, visit)
      for outer_v, inner_v in zip(eqn.outvars, body.jaxpr.outvars):
        if not isinstance(inner_v, jex.Literal) and inner_v in inner:
          leaf_of[outer_v] = inner[inner_v]
    elif leaf_at and eqn.primitive.name in _ELEMENT_PRESERVING and len(eqn.invars) == 1:
      outs = _bind(eqn, invals)
      leaf_of[eqn.outvars[0]] = leaf_at[0]
    else:
      outs = (visit(here, eqn, invals, leaf_at) if leaf_at else None) or _bind(eqn, invals)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


# --------------------------------------------------------------------------- layer operands


def _dot_operands(eqn, kernel_pos, activation, cotangent):
  """(G, T, C) inputs and (G, T, F) cotangents of a dot_general with a kernel operand."""
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
  return x, cotangent.reshape(groups, rows, -1)


def _conv_operands(eqn, kernel_pos, activation, cotangent):
  """(G, T, K·C/G) input patches and (G, T, F/G) cotangents of a convolution."""
  del kernel_pos  # always the rhs
  prm = eqn.params
  lhs_spec, rhs_spec, out_spec = prm["dimension_numbers"]
  groups = prm["feature_group_count"]
  kernel_shape = eqn.invars[1].aval.shape
  window = [kernel_shape[d] for d in rhs_spec[2:]]
  out_size = [cotangent.shape[d] for d in out_spec[2:]]
  x = activation.transpose(lhs_spec[0], *lhs_spec[2:], lhs_spec[1])  # (N, *spatial, C)
  pads = [(lo, hi, dilation - 1) for (lo, hi), dilation in zip(prm["padding"], prm["lhs_dilation"])]
  x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *pads, (0, 0, 0)])
  patches = []
  for offset in itertools.product(*map(range, window)):
    start = [k * d for k, d in zip(offset, prm["rhs_dilation"])]
    limit = [s + (n - 1) * stride + 1 for s, n, stride in zip(start, out_size, prm["window_strides"])]
    patches.append(
        lax.slice(
            x,
            (0, *start, 0),
            (x.shape[0], *limit, x.shape[-1]),
            (1, *prm["window_strides"], 1),
        )
    )
  patches = jnp.stack(patches, axis=-2)  # (N, *out spatial, K, C)
  rows = math.prod(patches.shape[:-2])
  x = patches.reshape(rows, math.prod(window), groups, -1).transpose(2, 0, 1, 3).reshape(groups, rows, -1)
  y = cotangent.transpose(out_spec[0], *out_spec[2:], out_spec[1]).reshape(rows, groups, -1)
  return x, y.transpose(1, 0, 2)


def _lookup_operands(eqn, kernel_pos, indices, cotangent):
  """(T,) row ids (-1 where the lookup reads nothing) and (T, D) cotangents of a gather."""
  del kernel_pos  # always the table
  num_rows = eqn.invars[0].aval.shape[0]
  offset_dims = eqn.params["dimension_numbers"].offset_dims
  row_dims = [d for d in range(cotangent.ndim) if d not in offset_dims]
  rows = math.prod(cotangent.shape[d] for d in row_dims)
  y = cotangent.transpose(*row_dims, *offset_dims).reshape(rows, -1)
  ids = indices[..., 0].reshape(rows)
  if eqn.params["mode"] in _CLAMPED_LOOKUPS:
    return jnp.clip(ids, 0, num_rows - 1), y
  return jnp.where((ids >= 0) & (ids < num_rows), ids, -1), y  # FILL_OR_DROP


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


def _tappable(eqn, leaf_at: dict[int, int]) -> int | None:
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


def _cheaper_form(kind: str, x_shape, y_shape, num_rows: int | None) -> str:
  if kind == "gather":
    (t, d) = y_shape
    return "gram" if t * t <= num_rows else "scatter"
  _, t, c = x_shape
  f = y_shape[-1]
  return "gram" if t * t * (c + f) <= t * c * f else "outer"


# --------------------------------------------------------------------------- norms


def _product_sq_norm(form: str, x: jax.Array, y: jax.Array) -> jax.Array:
  """Σ_g ||X_gᵀ Y_g||² for x (G, T, C), y (G, T, F), by the outer or the Gram form."""
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  if form == "gram":
    return jnp.sum(jnp.einsum("gtc,gsc->gts", x, x) * jnp.einsum("gtf,gsf->gts", y, y))
  return jnp.sum(jnp.einsum("gtc,gtf->gcf", x, y) ** 2)


def _lookup_sq_norm(form: str, num_rows: int, ids: jax.Array, y: jax.Array) -> jax.Array:
  """||Σ_t e_{id_t} ȳ_tᵀ||² for ids (T,) (-1: no row) and y (T, D)."""
  y = jnp.where((ids >= 0)[:, None], y.astype(jnp.float32), 0.0)
  if form == "gram":
    same = (ids[:, None] == ids[None, :]) & (ids >= 0)[:, None]
    return jnp.sum(jnp.where(same, y @ y.T, 0.0))
  table = jnp.zeros((num_rows, y.shape[-1]), jnp.float32).at[ids].add(y, mode="drop")
  return jnp.sum(table**2)


def _tap_sq_norm(tap: Tap, activation: jax.Array, cotangent: jax.Array) -> jax.Array:
  """Squared norm of one example's gradient for the tapped leaf."""
  x, y = _OPERANDS[tap.kind](tap.eqn, tap.kernel_pos, activation, cotangent)
  if tap.kind == "gather":
    return _lookup_sq_norm(tap.form, tap.eqn.invars[0].aval.shape[0], x, y)
  return _product_sq_norm(tap.form, x, y)


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
    for leaf in leaf_at.values():
      reads.setdefault(leaf, []).append((path, eqn, leaf_at))

  def walk_all(*args):
    leaf_of = {v: i for i, v in enumerate(closed.jaxpr.invars[: len(leaves)])}
    return _walk(closed.jaxpr, closed.consts, args, leaf_of, (), record)

  jax.eval_shape(walk_all, *closed.in_avals)
  taps, per_example = {}, []
  for leaf, uses in sorted(reads.items()):
    pos = _tappable(uses[0][1], uses[0][2]) if len(uses) == 1 else None
    if pos is None:
      per_example.append(leaf)
      continue
    path, eqn, _ = uses[0]
    kind = eqn.primitive.name
    act, out = eqn.invars[1 - pos].aval, eqn.outvars[0].aval
    x, y = jax.eval_shape(
        lambda a, o: _OPERANDS[kind](eqn, pos, a, o),
        jax.ShapeDtypeStruct(act.shape, act.dtype),
        jax.ShapeDtypeStruct(out.shape, out.dtype),
    )
    rows = eqn.invars[0].aval.shape[0] if kind == "gather" else None
    taps[path] = Tap(kind, leaf, pos, eqn, _cheaper_form(kind, x.shape, y.shape, rows))
  names = tuple(jax.tree_util.keystr(p) for p, _ in leaves_with_paths)
  return GhostPlan(closed, taps, tuple(per_example), names)


def ghost_sums(
    loss_fn, params: PyTree, batch: PyTree, mask: jax.Array
) -> tuple[jax.Array, PyTree, jax.Array]:
  """``(Σ loss, Σ g_i, (||g_i||²)_i)`` over the real rows, from one backward pass.

  ``mask`` is a bool (B,) array; padded rows get a zero norm and add nothing.
  The summed gradient is float32, shaped like ``params``.
  """
  plan = trace_plan(loss_fn, params, batch)
  leaves, treedef = jax.tree.flatten(params)
  b = mask.shape[0]
  per_example = set(plan.per_example_leaves)
  shared = [None if i in per_example else x for i, x in enumerate(leaves)]
  copies = {i: jnp.broadcast_to(leaves[i], (b, *jnp.shape(leaves[i]))) for i in per_example}
  zeros = {
      path: jnp.zeros((b, *tap.eqn.outvars[0].aval.shape), tap.eqn.outvars[0].aval.dtype)
      for path, tap in plan.taps.items()
  }
  example_leaves = [x[:, None] for x in jax.tree.leaves(batch)]  # one example = a batch of 1

  def one_example(shared, copies, perturbation, example):
    activations = {}

    def tap_layer(path, eqn, invals, leaf_at):
      tap = plan.taps.get(path)
      if tap is None:
        return None
      activations[path] = invals[1 - tap.kernel_pos]
      return [_bind(eqn, invals)[0] + perturbation[path]]

    args = [copies[i] if i in copies else x for i, x in enumerate(shared)] + list(example)
    leaf_of = {v: i for i, v in enumerate(plan.jaxpr.jaxpr.invars[: len(leaves)])}
    (losses,) = _walk(plan.jaxpr.jaxpr, plan.jaxpr.consts, args, leaf_of, (), tap_layer)
    return losses[0], activations

  def masked_sum(shared, copies, perturbation):
    losses, activations = jax.vmap(one_example, in_axes=(None, 0, 0, 0))(
        shared, copies, perturbation, example_leaves
    )
    return jnp.sum(jnp.where(mask, losses, 0.0)).astype(jnp.float32), activations

  (loss_sum, activations), (g_shared, g_copies, cotangents) = jax.value_and_grad(
      masked_sum, argnums=(0, 1, 2), has_aux=True
  )(shared, copies, zeros)
  sq_norms = jnp.zeros((b,), jnp.float32)
  for path, tap in plan.taps.items():
    norm = jax.vmap(lambda a, c, tap=tap: _tap_sq_norm(tap, a, c))
    sq_norms += norm(activations[path], cotangents[path])
  sum_g = list(g_shared)
  for i, g in g_copies.items():
    g = g.astype(jnp.float32)
    sq_norms += jnp.sum(g.reshape(b, -1) ** 2, axis=1)
    sum_g[i] = jnp.sum(g, axis=0)
  sum_g = treedef.unflatten([g.astype(jnp.float32) for g in sum_g])
  return loss_sum, sum_g, jnp.where(mask, sq_norms, 0.0)
