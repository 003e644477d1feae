"""A leaf read by a higher-order primitive the taps do not walk (cond, while, custom derivative
rules): named in describe(), a warning once per primitive, never a crash, exact against brute force."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ghost import assert_ghost_matches

from divebatch_jax.stats import taps


@jax.custom_jvp
def custom_dense(x, w):
  return x @ w


custom_dense.defjvp(lambda primals, tangents: (custom_dense(*primals), tangents[0] @ primals[1] + primals[0] @ tangents[1]))


@jax.custom_vjp
def custom_vjp_dense(x, w):
  return x @ w


custom_vjp_dense.defvjp(
    lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g)
)

READS = {
    "cond": lambda x, w: jax.lax.cond(jnp.sum(x) > 0, lambda: x @ w, lambda: x @ (2 * w)),
    "custom_jvp_call": custom_dense,
    "custom_vjp_call": custom_vjp_dense,
}


@pytest.mark.parametrize("primitive", list(READS))
def test_a_leaf_read_by_an_unknown_higher_order_primitive_is_named_warned_once_and_exact(primitive, monkeypatch):
  monkeypatch.setattr(taps, "_WARNED_PRIMITIVES", set())
  k = jax.random.split(jax.random.key(2), 3)
  params = {"w": jax.random.normal(k[0], (4, 4)) / 2, "v": jax.random.normal(k[1], (4, 3))}
  mask = np.array([True, True, False, True, True])
  batch = {"x": jax.random.normal(k[2], (5, 4)).at[~mask].set(jnp.nan)}

  def loss_fn(p, b):
    return jnp.sum(READS[primitive](b["x"], p["w"]) @ p["v"], -1) ** 2

  with pytest.warns(UserWarning, match=rf"\['w'\] enter '{primitive}', a higher-order primitive") as caught:
    forms = taps.trace_plan(loss_fn, params, batch).describe()
  assert len([w for w in caught if "higher-order" in str(w.message)]) == 1
  assert forms["['w']"].startswith(f"per-example fallback (read by {primitive}"), forms
  assert forms["['v']"].startswith("dot_general"), forms
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # said once: a second plan of the same loss is silent
    taps.trace_plan(loss_fn, params, batch)
  assert_ghost_matches(loss_fn, params, batch, mask)


def test_a_leaf_read_by_a_while_loop_is_named_in_the_plan(monkeypatch):
  """while_loop has no reverse-mode derivative (neither step can run); the plan still names it."""
  monkeypatch.setattr(taps, "_WARNED_PRIMITIVES", set())
  params = {"w": jnp.eye(3)}

  def loss_fn(p, b):
    return jnp.sum(jax.lax.while_loop(lambda c: jnp.sum(c) < 9, lambda c: c @ p["w"] + 1, b["x"]), -1)

  with pytest.warns(UserWarning, match="enter 'while'"):
    forms = taps.trace_plan(loss_fn, params, {"x": jnp.ones((2, 3))}).describe()
  assert forms["['w']"].startswith("per-example fallback (read by while"), forms


def test_a_fallback_from_a_known_primitive_names_none():
  """A weight closed over by a scan body falls back as documented, with no primitive named."""
  params = {"w": jnp.eye(3)}

  def loss_fn(p, b):
    return jnp.sum(jax.lax.scan(lambda h, _: (h @ p["w"], None), b["x"], None, length=2)[0], -1)

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    forms = taps.trace_plan(loss_fn, params, {"x": jnp.ones((2, 3))}).describe()
  assert forms == {"['w']": "per-example fallback"}
