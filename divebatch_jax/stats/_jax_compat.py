"""Every JAX internal the taps lean on, in one place, each checked by ``tests/test_jax_internals.py``.

The taps (:mod:`divebatch_jax.stats.taps`) re-evaluate a traced jaxpr with some of its
equations replaced, so they read what public JAX does not promise to keep: the jaxpr
types of ``jax.extend.core``, primitive names, the parameters of a few equations,
``Primitive.get_bind_params``, the checkpoint (remat) primitive's parameters and
``jax.custom_batching.custom_vmap``. Nothing else in this package touches them. When a
JAX release changes one, a test of ``tests/test_jax_internals.py`` named after it
fails with the internal's name (see :data:`INTERNALS`); a parameter that has moved
raises :class:`JaxInternalsChanged` naming the primitive and parameter here, rather
than a ``KeyError`` deep in a trace.

Each entry of :data:`INTERNALS` is ``name -> what is assumed``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from jax import lax
from jax.custom_batching import custom_vmap  # noqa: F401  (re-exported: INTERNALS["custom_vmap"])
from jax.extend import core as jex

Jaxpr = jex.Jaxpr
ClosedJaxpr = jex.ClosedJaxpr
JaxprEqn = jex.JaxprEqn
Literal = jex.Literal

# Call primitives whose body is one jaxpr evaluated once: walked in place ("jit" is
# jax >= 0.5's name of "pjit").
CALL_PRIMITIVES = frozenset({"jit", "pjit", "closed_call", "core_call"})
# jax.checkpoint / jax.remat / nnx.remat / linen nn.remat: "remat2" since jax 0.4.x's
# rewrite (jax 0.10 included), "checkpoint" and "remat" in older releases.
CHECKPOINT_PRIMITIVES = frozenset({"remat2", "checkpoint", "remat"})
SCAN = "scan"
# The primitives the taps substitute (their names are also the taps' kinds in describe()).
DOT, CONV, GATHER = "dot_general", "conv_general_dilated", "gather"
CONVERT = "convert_element_type"
# Gather modes for which the row a lookup reads is known (PROMISE_IN_BOUNDS clamps), and
# the mode that reads nothing out of bounds.
CLAMPED_GATHER_MODES = (lax.GatherScatterMode.CLIP, lax.GatherScatterMode.PROMISE_IN_BOUNDS)
FILL_OR_DROP = lax.GatherScatterMode.FILL_OR_DROP
# One-input primitives whose output holds exactly the elements of their input.
ELEMENT_PRESERVING = frozenset({"convert_element_type", "copy", "copy_p", "reshape", "transpose", "squeeze"})
# Primitives through which a leaf enters elementwise (biases, norm scales).
ELEMENTWISE = frozenset({"mul", "add", "add_any", "sub", "div", "neg", "max", "min", "broadcast_in_dim", "select_n"})
# The parameters read from each primitive's equations.
PARAMS = {
    DOT: ("dimension_numbers",),
    CONV: (
        "dimension_numbers", "feature_group_count", "batch_group_count", "window_strides", "padding",
        "lhs_dilation", "rhs_dilation",
    ),
    GATHER: ("dimension_numbers", "slice_sizes", "mode"),
    SCAN: ("jaxpr", "num_consts", "num_carry", "length", "reverse", "unroll"),
    "remat2": ("jaxpr", "policy", "prevent_cse"),
}

INTERNALS = {
    "jax.extend.core": "Jaxpr, ClosedJaxpr, JaxprEqn and Literal; eqn.primitive, .params, .invars, .outvars",
    "get_bind_params": "Primitive.get_bind_params(eqn.params) gives bind's keyword arguments",
    "custom_vmap": "jax.custom_batching.custom_vmap with def_vmap(axis_size, in_batched, *args)",
    "call primitives": f"jax.jit's equation is one of {sorted(CALL_PRIMITIVES)} with its body in params['jaxpr']",
    "checkpoint primitive": (
        f"jax.checkpoint's equation is one of {sorted(CHECKPOINT_PRIMITIVES)}, params jaxpr (open), "
        "policy, prevent_cse"
    ),
    "scan params": f"lax.scan's equation has params {PARAMS[SCAN]}, body a ClosedJaxpr",
    "dot_general params": "dimension_numbers ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))",
    "conv_general_dilated params": f"{PARAMS['conv_general_dilated']}, dimension_numbers (lhs, rhs, out) specs",
    "gather params": "GatherDimensionNumbers(offset_dims, collapsed_slice_dims, start_index_map, "
    "operand_batching_dims), slice_sizes, mode (a lax.GatherScatterMode)",
    "primitive names": "lax.dot_general_p is named 'dot_general'; elementwise and layout primitive names",
}


class JaxInternalsChanged(RuntimeError):
  """A JAX internal the taps rely on is not what :data:`INTERNALS` says."""


def param(eqn: jex.JaxprEqn, name: str) -> Any:
  """``eqn.params[name]``, or :class:`JaxInternalsChanged` naming the primitive and parameter."""
  try:
    return eqn.params[name]
  except KeyError:
    raise JaxInternalsChanged(
        f"JAX internal changed: the {eqn.primitive.name!r} equation has no parameter {name!r} "
        f"(it has {sorted(eqn.params)}); update divebatch_jax/stats/_jax_compat.py"
    ) from None


def primitive_name(eqn: jex.JaxprEqn) -> str:
  return eqn.primitive.name


def params(eqn: jex.JaxprEqn) -> dict[str, Any]:
  """The parameters :data:`PARAMS` lists for the equation's primitive (each checked by :func:`param`)."""
  return {name: param(eqn, name) for name in PARAMS[eqn.primitive.name]}


def bind(eqn: jex.JaxprEqn, invals: list) -> list:
  """The equation's primitive applied to ``invals`` with its own parameters (a list of outputs)."""
  out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
  return list(out) if eqn.primitive.multiple_results else [out]


def bind_dot(eqn: jex.JaxprEqn, lhs, rhs, dimension_numbers):
  """A ``dot_general`` equation bound with other dimension numbers."""
  return lax.dot_general_p.bind(lhs, rhs, **(eqn.params | {"dimension_numbers": dimension_numbers}))


def is_dot(eqn: jex.JaxprEqn) -> bool:
  return eqn.primitive is lax.dot_general_p


def _closed(body) -> jex.ClosedJaxpr | None:
  if isinstance(body, jex.Jaxpr):
    return jex.ClosedJaxpr(body, ())
  return body if isinstance(body, jex.ClosedJaxpr) else None


def call_body(eqn: jex.JaxprEqn) -> jex.ClosedJaxpr | None:
  """The body of a call or checkpoint equation, walked in place; None for any other."""
  name = eqn.primitive.name
  if name not in CALL_PRIMITIVES and name not in CHECKPOINT_PRIMITIVES:
    return None
  return _closed(eqn.params.get("jaxpr", eqn.params.get("call_jaxpr")))


class Checkpoint(NamedTuple):
  """A checkpoint equation's options, to re-wrap its substituted body in ``jax.checkpoint``."""

  policy: Any  # a jax.checkpoint_policies callable, or None (save nothing)
  prevent_cse: bool


def checkpoint_options(eqn: jex.JaxprEqn) -> Checkpoint | None:
  """The user's rematerialisation at ``eqn`` (``jax.checkpoint``, ``nnx.remat``, linen
  ``nn.remat``), or None when ``eqn`` is no checkpoint."""
  if eqn.primitive.name not in CHECKPOINT_PRIMITIVES:
    return None
  return Checkpoint(param(eqn, "policy"), bool(param(eqn, "prevent_cse")))


class Scan(NamedTuple):
  body: jex.ClosedJaxpr
  num_consts: int
  num_carry: int
  length: int
  reverse: bool
  unroll: Any


def scan_params(eqn: jex.JaxprEqn) -> Scan | None:
  """A ``lax.scan`` equation's body and options, or None for any other equation."""
  if eqn.primitive.name != SCAN:
    return None
  return Scan(*(param(eqn, name) for name in PARAMS[SCAN]))


def is_higher_order(eqn: jex.JaxprEqn) -> bool:
  """Whether the equation carries a jaxpr in its parameters (cond, while, custom
  derivative rules, shard_map, ...): a function the walker would need to know."""

  def holds_jaxpr(value) -> bool:
    if isinstance(value, (jex.Jaxpr, jex.ClosedJaxpr)):
      return True
    return isinstance(value, (tuple, list)) and any(holds_jaxpr(v) for v in value)

  return any(holds_jaxpr(v) for v in eqn.params.values())
