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
    >>> from divebatch_jax.stats import ghost as taps
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

The package: :mod:`.walker` walks the jaxpr and substitutes nothing itself;
:mod:`.rules` is the rule table keyed by primitive, with one module per layer kind
(:mod:`.dot`, :mod:`.conv`, :mod:`.lookup`); :mod:`.forms` holds the Gram and product
forms' backward passes, :mod:`.links` the inner products and tied tables, :mod:`.cost`
the cost model, :mod:`.plan` :func:`trace_plan` and :mod:`.sums` :func:`ghost_sums`.
:mod:`divebatch_jax.stats.taps` re-exports them.
"""

from divebatch_jax.stats.ghost.cost import GRAM_COST_FACTOR, gram_factor
from divebatch_jax.stats.ghost.forms import EXAMPLE_AXIS
from divebatch_jax.stats.ghost.plan import trace_plan
from divebatch_jax.stats.ghost.sums import GhostSums, ghost_sums
from divebatch_jax.stats.ghost.types import GhostPlan, LeafView, Tap

__all__ = [
    "EXAMPLE_AXIS",
    "GRAM_COST_FACTOR",
    "GhostPlan",
    "GhostSums",
    "LeafView",
    "Tap",
    "ghost_sums",
    "gram_factor",
    "trace_plan",
]
