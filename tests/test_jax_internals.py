"""Every JAX internal the taps use (divebatch_jax/stats/_jax_compat.py's INTERNALS), one test each.

When a JAX release changes one, its test fails with "JAX internal changed: <name>" and what the
taps assume; and no other module of the package touches JAX internals."""

import re
from pathlib import Path

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from divebatch_jax.stats import _jax_compat as compat


def expect(condition, internal: str, detail: str = ""):
  assert condition, f"JAX internal changed: {internal} ({compat.INTERNALS[internal]}). {detail}"


def only_eqn(fn, *args, name=None):
  eqns = jax.make_jaxpr(fn)(*args).jaxpr.eqns
  found = [e for e in eqns if name is None or compat.primitive_name(e) == name]
  return found[0] if found else None


def first_checkpoint(jaxpr):
  """The first checkpoint equation in ``jaxpr`` or the bodies of its calls."""
  for eqn in jaxpr.eqns:
    if compat.primitive_name(eqn) in compat.CHECKPOINT_PRIMITIVES:
      return eqn
    body = compat.call_body(eqn)
    found = None if body is None else first_checkpoint(body.jaxpr)
    if found is not None:
      return found
  return None


def check_extend_core():
  internal = "jax.extend.core"
  closed = jax.make_jaxpr(lambda x: x * 2.0 + 1.0)(jnp.ones(3))
  expect(isinstance(closed, compat.ClosedJaxpr) and isinstance(closed.jaxpr, compat.Jaxpr), internal, str(type(closed)))
  eqn = closed.jaxpr.eqns[0]
  expect(isinstance(eqn, compat.JaxprEqn), internal, str(type(eqn)))
  literal = eqn.invars[1]
  expect(isinstance(literal, compat.Literal) and float(literal.val) == 2.0, internal, repr(literal))
  expect(eqn.invars[0].aval.shape == (3,) and eqn.outvars[0].aval.shape == (3,), internal, "aval.shape")
  expect(compat.primitive_name(eqn) == "mul" and isinstance(eqn.params, dict), internal, repr(eqn))


def check_get_bind_params():
  """Re-evaluating equations one by one with compat.bind gives the function's outputs."""

  def fn(x, w, ids):
    h = jax.jit(lambda x: jnp.tanh(x @ w))(x)
    h = jax.checkpoint(lambda h: h * 2.0, policy=jax.checkpoint_policies.dots_saveable)(h)
    h = lax.scan(lambda c, _: (c @ w, None), h, None, length=2)[0]
    return h.sum() + w[ids].sum()

  args = (jnp.ones((2, 3)), jnp.eye(3) / 2, jnp.array([0, 2]))
  closed = jax.make_jaxpr(fn)(*args)
  env = dict(zip(closed.jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, compat.Literal) else env[v]
  for eqn in closed.jaxpr.eqns:
    env.update(zip(eqn.outvars, compat.bind(eqn, [read(v) for v in eqn.invars])))
  expect(np.allclose(read(closed.jaxpr.outvars[0]), fn(*args)), "get_bind_params")


def check_custom_vmap():
  seen = []

  @compat.custom_vmap
  def f(x, y):
    return x + y

  @f.def_vmap
  def rule(axis_size, in_batched, x, y):
    seen.append((axis_size, tuple(in_batched)))
    return x + y, True

  out = jax.vmap(f, in_axes=(0, None))(jnp.ones(4), 1.0)
  expect(seen == [(4, (True, False))] and np.allclose(out, 2.0), "custom_vmap", repr(seen))


def check_call_primitives():
  eqn = only_eqn(jax.jit(lambda x: x + 1), 1.0)
  expect(compat.primitive_name(eqn) in compat.CALL_PRIMITIVES, "call primitives", compat.primitive_name(eqn))
  expect(compat.call_body(eqn) is not None, "call primitives", sorted(eqn.params))


def check_checkpoint_primitive():
  internal = "checkpoint primitive"
  policy = jax.checkpoint_policies.dots_saveable
  eqns = {
      "jax.checkpoint": only_eqn(jax.checkpoint(jnp.sin, policy=policy, prevent_cse=False), 1.0),
      "jax.remat": only_eqn(jax.remat(jnp.sin, policy=policy, prevent_cse=False), 1.0),
      "nnx.remat": only_eqn(nnx.remat(jnp.sin, policy=policy, prevent_cse=False), 1.0),
  }

  class Linen(linen.Module):
    @linen.compact
    def __call__(self, x):
      return linen.remat(linen.Dense, policy=policy, prevent_cse=False)(2)(x)

  net = Linen()
  params = net.init(jax.random.key(0), jnp.ones((1, 2)))
  eqns["linen nn.remat"] = first_checkpoint(jax.make_jaxpr(lambda p: net.apply(p, jnp.ones((1, 2))))(params).jaxpr)
  for form, eqn in eqns.items():
    name = compat.primitive_name(eqn)
    expect(name in compat.CHECKPOINT_PRIMITIVES, internal, f"{form} binds {name!r}")
    expect(compat.checkpoint_options(eqn) == (policy, False), internal, f"{form}: {compat.checkpoint_options(eqn)}")
    expect(isinstance(compat.param(eqn, "jaxpr"), compat.Jaxpr) and compat.call_body(eqn) is not None, internal, form)


def check_scan_params():
  eqn = only_eqn(lambda xs: lax.scan(lambda c, x: (c + x, c), 0.0, xs), jnp.ones(3))
  scan = compat.scan_params(eqn)
  expect(scan is not None and isinstance(scan.body, compat.ClosedJaxpr), "scan params", compat.primitive_name(eqn))
  expect((scan.num_consts, scan.num_carry, scan.length, scan.reverse) == (0, 1, 3, False), "scan params", repr(scan[1:]))


def check_dot_general_params():
  eqn = only_eqn(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5)))
  expect(compat.is_dot(eqn) and compat.primitive_name(eqn) == compat.DOT, "dot_general params", compat.primitive_name(eqn))
  dims = compat.param(eqn, "dimension_numbers")
  expect(tuple(map(tuple, dims[0])) == ((2,), (1,)) and tuple(map(tuple, dims[1])) == ((0,), (0,)), "dot_general params", repr(dims))
  out = compat.bind_dot(eqn, jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5)), dims)
  expect(out.shape == (2, 3, 5), "dot_general params", str(out.shape))


def check_conv_params():
  internal = "conv_general_dilated params"
  fn = lambda x, w: lax.conv_general_dilated(x, w, (2, 1), "SAME", rhs_dilation=(1, 2), feature_group_count=2,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
  eqn = only_eqn(fn, jnp.ones((1, 6, 6, 4)), jnp.ones((3, 3, 2, 6)))
  expect(compat.primitive_name(eqn) == compat.CONV, internal, compat.primitive_name(eqn))
  prm = compat.params(eqn)
  lhs_spec, rhs_spec, out_spec = prm["dimension_numbers"]
  expect((tuple(lhs_spec), tuple(rhs_spec), tuple(out_spec)) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)), internal, repr(prm))
  expect(prm["feature_group_count"] == 2 and prm["batch_group_count"] == 1, internal, repr(prm))
  expect(tuple(prm["window_strides"]) == (2, 1) and tuple(prm["rhs_dilation"]) == (1, 2), internal, repr(prm))
  expect(tuple(prm["lhs_dilation"]) == (1, 1) and len(prm["padding"]) == 2, internal, repr(prm))


def check_gather_params():
  internal = "gather params"
  eqn = only_eqn(lambda t, ids: t[ids], jnp.ones((5, 3)), jnp.array([0, 4]), name=compat.GATHER)
  expect(eqn is not None, internal, "t[ids] binds no 'gather'")
  prm = compat.params(eqn)
  dims = prm["dimension_numbers"]
  expect((dims.offset_dims, dims.collapsed_slice_dims, dims.start_index_map, dims.operand_batching_dims)
         == ((1,), (0,), (0,), ()), internal, repr(dims))
  expect(tuple(prm["slice_sizes"]) == (1, 3), internal, repr(prm["slice_sizes"]))
  expect(prm["mode"] in (*compat.CLAMPED_GATHER_MODES, compat.FILL_OR_DROP), internal, repr(prm["mode"]))


def check_primitive_names():
  internal = "primitive names"
  for name in (compat.ELEMENTWISE | compat.ELEMENT_PRESERVING) - {"add_any", "copy_p"}:
    primitive = getattr(lax, f"{name}_p", None)
    expect(primitive is not None and primitive.name == name, internal, f"lax.{name}_p")
  expect(lax.dot_general_p.name == compat.DOT and lax.conv_general_dilated_p.name == compat.CONV, internal)
  expect(lax.gather_p.name == compat.GATHER and lax.convert_element_type_p.name == compat.CONVERT, internal)
  # x + x's cotangents meet in add_any, through which a leaf's gradient passes elementwise.
  eqns = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(jnp.sin(x) * jnp.cos(x))))(jnp.ones(2)).jaxpr.eqns
  expect("add_any" in {compat.primitive_name(e) for e in eqns}, internal, "add_any")


CHECKS = {
    "jax.extend.core": check_extend_core,
    "get_bind_params": check_get_bind_params,
    "custom_vmap": check_custom_vmap,
    "call primitives": check_call_primitives,
    "checkpoint primitive": check_checkpoint_primitive,
    "scan params": check_scan_params,
    "dot_general params": check_dot_general_params,
    "conv_general_dilated params": check_conv_params,
    "gather params": check_gather_params,
    "primitive names": check_primitive_names,
}


@pytest.mark.parametrize("internal", list(compat.INTERNALS))
def test_jax_internal(internal):
  CHECKS[internal]()


def test_every_internal_has_a_check():
  assert set(CHECKS) == set(compat.INTERNALS)


def test_a_missing_parameter_names_the_primitive_and_the_parameter():
  eqn = only_eqn(lambda a, b: a @ b, jnp.ones((2, 2)), jnp.ones((2, 2)))
  with pytest.raises(compat.JaxInternalsChanged, match=r"'dot_general' equation has no parameter 'window'"):
    compat.param(eqn, "window")


INTERNAL_USES = re.compile(
    r"jax\._src|jax\.extend|jax\.core\b|get_bind_params|jax\.custom_batching|(?<!compat\.)custom_vmap\(|"
    r"\beqns?\.params|\.primitive\b|\blax\.\w+_p\b"
)


def test_no_module_but_the_compatibility_module_touches_jax_internals():
  package = Path(__file__).resolve().parent.parent / "divebatch_jax"
  offenders = []
  for path in package.rglob("*.py"):
    if path.name == "_jax_compat.py":
      continue
    code = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    offenders += [f"{path.relative_to(package)}: {line.strip()}" for line in code
                  if INTERNAL_USES.search(line) and "``" not in line and ":func:" not in line]
  assert not offenders, "JAX internals outside divebatch_jax/stats/_jax_compat.py:\n" + "\n".join(offenders)
