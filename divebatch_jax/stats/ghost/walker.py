"""The jaxpr walker: re-evaluates a traced loss equation by equation, tracking which variables
are parameter leaves, and lets a ``visit`` callback substitute the equations that read one.
It walks into calls, checkpoints (re-wrapped with the user's policy) and scans; it
substitutes nothing itself.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax import lax

from divebatch_jax.stats import _jax_compat as compat
from divebatch_jax.stats.ghost.types import LeafView, Path


# One-input primitives whose output holds exactly the elements of their input: a
# gradient through them keeps its norm, so their output still counts as the leaf.
_ELEMENT_PRESERVING = compat.ELEMENT_PRESERVING


# Call primitives whose body is walked in place when a parameter enters them.
_INLINED_CALLS = compat.CALL_PRIMITIVES | compat.CHECKPOINT_PRIMITIVES


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

