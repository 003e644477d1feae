"""Taps through rematerialisation: every form of jax.checkpoint is walked like its body, and
the statistics step keeps the user's remat (same policy, same prevent_cse). Each checked
against brute force (a Python loop of jax.grad, one example at a time, float64 sums)."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.extend import core as jex
from test_ghost import assert_ghost_matches

from divebatch_jax.stats import preferred_method, taps

cp = jax.checkpoint_policies
POLICIES = {
    "none": None,
    "nothing": cp.nothing_saveable,
    "dots": cp.dots_saveable,
    "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
    "everything": cp.everything_saveable,
    "names": cp.save_only_these_names("hidden"),
    "offload": cp.save_and_offload_only_these_names(
        names_which_can_be_saved=["hidden"], names_which_can_be_offloaded=[], offload_src="device",
        offload_dst="pinned_host",
    ),
}
MASK = np.array([True, False, True, True, False, True])


def checkpoints_in(closed) -> list:
  """Every checkpoint equation of a jaxpr, nested ones (scan, jit, custom rules) included."""
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("remat2", "checkpoint", "remat"):
        found.append(eqn)
      for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(v, jex.ClosedJaxpr):
            visit(v.jaxpr)
          elif isinstance(v, jex.Jaxpr):
            visit(v)

  visit(closed.jaxpr)
  return found


def mlp_setup(seed=0, layers=1):
  k = jax.random.split(jax.random.key(seed), 5)
  stack = lambda key, shape: jax.random.normal(key, (layers, *shape) if layers > 1 else shape) / 2
  params = {"w1": stack(k[0], (4, 6)), "b1": stack(k[1], (6,)), "w2": stack(k[2], (6, 4))}
  x = jax.random.normal(k[3], (6, 3, 4)).at[~MASK].set(jnp.nan)  # garbage in the masked rows
  return params, {"x": x}


def block(p, x):
  h = checkpoint_name(jnp.tanh(x @ p["w1"] + p["b1"]), "hidden")
  return x + h @ p["w2"]


def squared(h):
  return jnp.sum(h**2, axis=(1, 2))


FORMS = {
    "jax.checkpoint": lambda p, x: jax.checkpoint(block)(p, x),
    "jax.remat": lambda p, x: jax.remat(block)(p, x),
    "static_argnums": lambda p, x: jax.checkpoint(lambda p, x, n: block(p, x) * n, static_argnums=(2,))(p, x, 2.0),
    "inside jit inside checkpoint": lambda p, x: jax.checkpoint(jax.jit(lambda p, x: jax.checkpoint(block)(p, x)))(p, x),
    "scan inside checkpoint": lambda p, x: jax.checkpoint(
        lambda p, x: jax.lax.scan(lambda h, _: (block(p, h), None), x, None, length=2)[0]
    )(p, x),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_of_checkpoint_is_walked_and_equals_brute_force(form):
  params, batch = mlp_setup()
  loss_fn = lambda p, b: squared(FORMS[form](p, b["x"]))
  forms = taps.trace_plan(loss_fn, params, batch).describe()
  if form == "scan inside checkpoint":  # weights closed over by a scan body: every iteration
    assert forms["['w1']"] == "per-example fallback", forms
  else:
    assert not [how for how in forms.values() if "fallback" in how], forms
    assert forms["['w1']"].startswith("dot_general") and forms["['b1']"] == "elementwise", forms
  assert_ghost_matches(loss_fn, params, batch, MASK)


@pytest.mark.parametrize("prevent_cse", [True, False])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_scanned_checkpoint_with_any_policy_keeps_it_in_the_statistics_step(policy, prevent_cse):
  """Stacked weights, the block under jax.checkpoint inside lax.scan (nnx.scan(nnx.remat)):
  tapped, exact, and every checkpoint of the statistics step has the user's policy and
  prevent_cse (the substituted body is rematerialised as the user's was)."""
  params, batch = mlp_setup(layers=2)
  remat = jax.checkpoint(block, policy=POLICIES[policy], prevent_cse=prevent_cse)

  def loss_fn(p, b):
    return squared(jax.lax.scan(lambda h, layer: (remat(layer, h), None), b["x"], p)[0])

  forms = taps.trace_plan(loss_fn, params, batch).describe()
  assert not [how for how in forms.values() if "fallback" in how], forms
  assert_ghost_matches(loss_fn, params, batch, MASK)
  step = jax.make_jaxpr(lambda p, b: taps.ghost_sums(loss_fn, p, b, jnp.asarray(MASK), about_mean=True))
  found = checkpoints_in(step(params, batch))
  assert found, "the statistics step dropped the user's checkpoint"
  assert all(e.params["policy"] is POLICIES[policy] and e.params["prevent_cse"] == prevent_cse for e in found)


def test_tied_table_split_across_checkpoints_falls_back_and_is_exact():
  """A table looked up inside one checkpoint and read by a product outside it: the rows
  the taps pass from the lookup to the product cannot leave the checkpoint's trace, so
  the table gets per-example copies (exact); the other layers stay tapped."""
  k = jax.random.split(jax.random.key(3), 3)
  params = {"table": jax.random.normal(k[0], (9, 4)), "w": jax.random.normal(k[1], (4, 4))}

  def loss_fn(p, b):
    h = jax.checkpoint(lambda p, ids: jnp.tanh(p["table"][ids] @ p["w"]))(p, b["ids"])
    return -jnp.sum(jax.nn.log_softmax(h @ p["table"].T) * jax.nn.one_hot(b["y"], 9), axis=(1, 2))

  batch = {"ids": jax.random.randint(k[2], (6, 3), 0, 9), "y": jax.random.randint(k[2], (6, 3), 0, 9)}
  forms = taps.trace_plan(loss_fn, params, batch).describe()
  assert forms["['table']"] == "per-example fallback" and forms["['w']"].startswith("dot_general"), forms
  assert_ghost_matches(loss_fn, params, batch, MASK)


def test_a_leaf_returned_from_a_checkpoint_falls_back_and_is_exact():
  params, batch = mlp_setup()

  def loss_fn(p, b):
    h, w2 = jax.checkpoint(lambda p, x: (jnp.tanh(x @ p["w1"] + p["b1"]), p["w2"].T))(p, b["x"])
    return squared(h @ w2.T)

  forms = taps.trace_plan(loss_fn, params, batch).describe()
  assert forms["['w2']"] == "per-example fallback" and forms["['w1']"].startswith("dot_general"), forms
  assert_ghost_matches(loss_fn, params, batch, MASK)


def test_linen_remat_inside_linen_scan_is_tapped_and_exact():
  class Block(linen.Module):
    @linen.compact
    def __call__(self, h, _):
      y = linen.Dense(8)(linen.LayerNorm()(h))
      return h + linen.Dense(4)(jax.nn.gelu(y)), None

  class Net(linen.Module):
    @linen.compact
    def __call__(self, x):
      scanned = linen.scan(
          linen.remat(Block, prevent_cse=False, policy=cp.dots_saveable), variable_axes={"params": 0},
          split_rngs={"params": True}, length=2,
      )
      return scanned()(x, None)[0]

  net = Net()
  params, batch = net.init(jax.random.key(0), jnp.ones((1, 3, 4))), mlp_setup()[1]
  loss_fn = lambda p, b: squared(net.apply(p, b["x"]))
  forms = taps.trace_plan(loss_fn, params, batch).describe()
  assert not [how for how in forms.values() if "fallback" in how], forms
  assert preferred_method(loss_fn, params, batch) == "ghost"
  assert_ghost_matches(loss_fn, params, batch, MASK)


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "nnx-scan"])
@pytest.mark.parametrize("policy", ["none", "dots"])
def test_gpt_with_nnx_remat_blocks_has_no_fallback_and_auto_equals_brute_force(scan, policy):
  """The GPT of tests/tiny_gpt.py with every block in nnx.remat, in nnx.scan or unrolled:
  every leaf tapped or elementwise, ``auto`` runs the taps, exact at 1e-5 with garbage
  rows, and the statistics step keeps the blocks' checkpoints."""
  from tiny_gpt import TinyGPT, gpt_batch, gpt_loss

  model = TinyGPT(32, 8, 16, 2, 2, scan=scan, rngs=nnx.Rngs(0), remat=POLICIES[policy] or True)
  loss_fn, params = gpt_loss(model)
  batch = gpt_batch(5, 8, 32)
  described = taps.trace_plan(loss_fn, params, batch).describe()
  assert not [leaf for leaf, how in described.items() if how in ("per-example fallback", "unused")], described
  assert preferred_method(loss_fn, params, batch) == "ghost"
  mask = np.array([True, False, True, True, False])
  garbage = dict(batch, ids=batch["ids"].at[~mask].set(10**6))
  assert_ghost_matches(loss_fn, params, garbage, mask)
  step = jax.make_jaxpr(lambda p, b: taps.ghost_sums(loss_fn, p, b, jnp.asarray(mask)))(params, batch)
  assert len(checkpoints_in(step)) >= (1 if scan else 2)
