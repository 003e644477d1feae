"""A ready-made training step over the micro-batch engine: ``train_step(loss_fn, tx)``.

Given a pure per-example loss, an :func:`~divebatch_jax.adaptive_batch`
transformation (alone or inside ``optax.chain``), its batch-size ``policy`` and a
statistics method, :class:`TrainStep` runs one optimizer update per call:

* the plain step, or the instrumented one (per-example statistics riding on the
  same backward pass) when the policy's window asks for it (``epoch=``);
* on a batch ``(B, ...)`` with a ``(B,)`` mask, or a data pipeline's ``(K, m, ...)``
  layout with a ``(K, m)`` mask (K micro-batches summed inside the step);
* or, MultiSteps-style, as several calls of a fixed device batch:
  ``sums = step.accumulate(state, micro_batch, mask, sums)`` per micro-batch, then
  ``state, out = step.apply(state, sums)`` — a batch of any size, one executable;
* with auxiliary model state threaded through (BatchNorm's running averages;
  ``has_aux=True``), whose statistics come from micro-batch gradients;
* compiled once per input layout, ahead of time if asked (:meth:`TrainStep.precompile`,
  safe from a background thread), and never again for a learning-rate change: a
  rate set as a Python float (weakly typed) is converted to the state's own dtype;
* on parameters sharded any way over several devices (replicated, FSDP, tensor
  parallel, 2-D meshes): :meth:`TrainStep.init` puts every state leaf on the sharding
  of the parameter it belongs to and scalars replicated on the same mesh
  (:mod:`~divebatch_jax.transform.placement`), and every call returns the state on
  the shardings it came in with (batches sharded over the data axis).

Example (flax nnx, optax; zero weights, so every row's loss is log 3; 6 real rows of 8)::

    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import divebatch_jax as dbj
    >>> model = nnx.Linear(4, 3, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))
    >>> graphdef, params = nnx.split(model, nnx.Param)
    >>> def loss_fn(params, batch):                   # per-example losses, (B,)
    ...   logits = nnx.merge(graphdef, params)(batch["x"])
    ...   return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    >>> policy = dbj.policies.divebatch(0.01, 64, resize_every=2)
    >>> tx = dbj.adaptive_batch(optax.sgd(0.1), policy, num_examples=32, base_batch_size=8)
    >>> step = dbj.train_step(loss_fn, tx, policy=policy, method="auto")
    >>> state = step.init(params)
    >>> batch = {"x": jnp.ones((8, 4)), "y": jnp.zeros(8, jnp.int32)}
    >>> state, out = step(state, batch, jnp.arange(8) < 6, epoch=0)
    >>> round(float(out.loss), 4), int(out.count), step.needs_stats(0), step.needs_stats(1)
    (1.0986, 6, False, True)
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from divebatch_jax import stats as stats_lib
from divebatch_jax._aot import Executables
from divebatch_jax.stats import kernel, microbatch
from divebatch_jax.transform.placement import Placement, placed
from divebatch_jax.transform.policies import base as policy_base

PyTree = Any


class TrainState(NamedTuple):
  """Parameters, optimizer state and auxiliary model state (None without it)."""

  params: PyTree
  opt_state: PyTree
  aux: Any = None


class StepOutput(NamedTuple):
  """One update's mean loss over its real rows and their count (device scalars)."""

  loss: jax.Array
  count: jax.Array


def _shardings(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: x.sharding, tree)


def _strong(tree: PyTree) -> PyTree:
  """Python scalars and weakly typed arrays in ``tree`` as strongly typed arrays, so a
  learning rate set as a float does not change the step's signature (no recompile)."""

  def strong(x):
    if isinstance(x, (int, float)) and not isinstance(x, bool):
      return jnp.asarray(x, jnp.float32 if isinstance(x, float) else jnp.int32)
    if isinstance(x, jax.Array) and x.weak_type:
      return jnp.asarray(x, x.dtype)
    return x

  return jax.tree.map(strong, tree)


class TrainStep:
  """The jitted training step of ``loss_fn`` under ``tx``; see the module docstring.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses; with
      ``has_aux``, ``loss_fn(params, aux, batch, mask) -> (losses, new_aux)``.
    tx: the optax transformation. Its updates get ``stats=`` (instrumented steps)
      or ``count=`` (plain steps), so it must accept those extra arguments
      (:func:`~divebatch_jax.adaptive_batch` does, alone or inside ``optax.chain``).
    method: the statistics method of instrumented steps (``"auto"``, ``"exact"``,
      ``"ghost"``, ``"microbatch"``); ``"microbatch"`` with ``has_aux``.
    policy: the batch-size policy ``tx`` was built with; its window decides which
      steps are instrumented.
    has_aux: the loss threads auxiliary state (BatchNorm running averages).
    chunk_size: rows per chunk of per-example statistics, or per group of the
      micro-batch estimator (default: B // 8) where a step has one micro-batch.
    fuse: how :meth:`run` executes a step of one micro-batch: one fused call
      (gradient and update) when True, accumulate + apply when False. Default:
      fused on GPUs and TPUs, where a small step takes less device time than three
      host calls take to dispatch (on an H100 the engine's SmallCNN step at b = 128
      ran at 37k examples/s as zero + accumulate + apply, against 240k/s as one
      call; benchmarks/results/GPU_RUNS.md); accumulate + apply on the CPU, where
      the gradient executables then hold no optimizer and one update executable
      serves every layout, which halves what a run compiles (a 30-epoch DiveBatch
      digits run: 7 s of compiles against 20 s) while the extra calls cost little.
  """

  def __init__(
      self,
      loss_fn: Callable,
      tx: optax.GradientTransformation,
      *,
      policy: policy_base.BatchSizePolicy,
      method: str = "auto",
      has_aux: bool = False,
      chunk_size: int | None = None,
      fuse: bool | None = None,
  ):
    if method not in stats_lib.METHODS:
      raise ValueError(f"method must be one of {stats_lib.METHODS}, got {method!r}.")
    if has_aux and method != "microbatch":
      raise ValueError(
          f"method={method!r} needs per-example gradients, which a loss with auxiliary state "
          "(rows coupled within a batch, e.g. BatchNorm in train mode) does not define: use "
          "method='microbatch' (each micro-batch normalised over its own rows)."
      )
    if not isinstance(policy, policy_base.BatchSizePolicy):
      raise TypeError(
          "train_step needs policy=, the batch-size policy tx was built with (its window "
          f"decides which steps are instrumented), got {type(policy).__name__}."
      )
    self.policy = policy
    self.loss_fn, self.tx, self.method = loss_fn, tx, method
    self.has_aux, self.chunk_size = has_aux, chunk_size
    self._estimated = method == "microbatch"
    self._with_ip = self.policy.needs_inner_products
    self.fuse = jax.default_backend() != "cpu" if fuse is None else bool(fuse)
    self.executables = Executables()  # .stall_seconds: compile time on the calling thread

  # ------------------------------------------------------------------ pure functions

  def _loss(self, params, aux, batch, mask):
    """Per-example losses for the JVP of ``sum_ip`` (aux: the step's starting state)."""
    return self.loss_fn(params, aux, batch, mask)[0] if self.has_aux else self.loss_fn(params, batch)

  def _same_pass_ip(self, instrumented: bool, single: bool, rows: int) -> bool:
    """Whether the step's ``sum_ip`` comes from the pass that forms its sums
    (``StepSums.sum_ip``, about its own mean): the policy reads it and the step is one
    micro-batch of ``rows`` that a per-example method takes in one chunk. Otherwise
    :meth:`_ip_layout` takes one JVP pass about the step's mean (K >= 2 micro-batches,
    chunks, ``"microbatch"``)."""
    return (
        instrumented and self._with_ip and single
        and kernel.same_pass_inner_products(self.method, self.chunk_size, rows)
    )

  def _sums(self, params, aux, batch, mask, instrumented: bool, single: bool, with_ip: bool = False):
    """``(StepSums, aux)`` of one micro-batch; ``single``: the step's only micro-batch;
    ``with_ip``: ``sum_ip`` from the same pass (:meth:`_same_pass_ip`)."""
    if not instrumented or (self._estimated and not single):
      method = None  # plain sums; group_sq (free) serves the estimator over micro-batches
    else:
      method = self.method
    return stats_lib.micro_batch_sums(
        self.loss_fn, params, batch, mask, method=method, chunk_size=self.chunk_size,
        aux=aux if self.has_aux else None, with_ip=with_ip,
    )

  def _update(self, state: TrainState, sums, aux, instrumented: bool, sum_ip) -> tuple[TrainState, StepOutput]:
    loss, grad = stats_lib.mean_loss_and_grad(sums, state.params)
    if instrumented:
      record = kernel.record_of(sums, sum_ip, estimated=self._estimated)
      updates, opt_state = self.tx.update(grad, state.opt_state, state.params, stats=record)
    else:
      updates, opt_state = self.tx.update(grad, state.opt_state, state.params, count=sums.count)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, aux), StepOutput(loss, sums.count)

  def _ip(self, params, aux, sums, batch, mask):
    gbar = stats_lib.mean_gradient(sums)
    return kernel.jvp_sum_ip(lambda p, b: self._loss(p, aux, b, mask), params, gbar, batch, mask)

  def _ip_layout(self, params, aux, sums, batch, mask):
    """Σ_i <g_i, ḡ>² over a ``(B,)`` batch or a ``(K, m)`` layout: the micro-batches'
    terms added by the same summation as every other sum of the step."""
    if mask.ndim == 1:
      return self._ip(params, aux, sums, batch, mask)
    one = lambda carry, part, part_mask: (carry, self._ip(params, aux, sums, part, part_mask))
    return microbatch.sum_micro_batches(one, batch, mask)[1]

  def _fused(self, instrumented: bool):
    def fused(state: TrainState, batch, mask):
      single = mask.ndim == 1 or mask.shape[0] == 1
      same_pass = self._same_pass_ip(instrumented, single, mask.shape[-1])
      if mask.ndim == 1:
        sums, aux = self._sums(state.params, state.aux, batch, mask, instrumented, single=True, with_ip=same_pass)
      else:
        def one(aux, part, part_mask):
          sums, aux = self._sums(state.params, aux, part, part_mask, instrumented, single=single, with_ip=same_pass)
          return aux, sums

        aux, sums = microbatch.sum_micro_batches(one, batch, mask, state.aux)
      sum_ip = jnp.float32(jnp.nan)
      if same_pass:
        sum_ip = sums.sum_ip
      elif instrumented and self._with_ip:
        sum_ip = self._ip_layout(state.params, state.aux, sums, batch, mask)
      return self._update(state, sums, aux, instrumented, sum_ip)

    return fused

  def _accumulate(self, instrumented: bool, only: bool = False):
    """Adds one micro-batch to ``sums``; ``only``: it is the step's only one, so the
    micro-batch estimator forms its groups within it and, where :meth:`_same_pass_ip`,
    its ``sum_ip`` comes from the same pass."""

    def accumulate(params, aux, sums, batch, mask):
      with_ip = only and self._same_pass_ip(instrumented, True, mask.shape[0])
      part, aux = self._sums(params, aux, batch, mask, instrumented, single=only, with_ip=with_ip)
      return microbatch.add_sums(sums, part), aux

    return accumulate

  def _apply(self, instrumented: bool):
    def apply(state: TrainState, sums, sum_ip):
      return self._update(state, sums, state.aux, instrumented, sum_ip)

    return apply

  # ------------------------------------------------------------------ executables

  def _compiled(self, kind: str, instrumented: bool, make: Callable, args: tuple, donate: tuple, out=None):
    """The executable of ``kind`` for the shapes (and shardings) of ``args``, compiled once
    (thread-safe); ``out``: None, or a thunk of the outputs' shardings."""
    jitted = lambda: jax.jit(make(instrumented), donate_argnums=donate, **({} if out is None else {"out_shardings": out()}))
    return self.executables.get((kind, instrumented), jitted, args)

  @staticmethod
  def _step_out(placement, state) -> Callable | None:
    """The out-shardings thunk of a call returning ``(state, StepOutput)``: the state where
    it came in, the loss and count replicated."""
    if placement is None:
      return None
    return lambda: (_shardings(state), StepOutput(placement.replicated, placement.replicated))

  def _accumulated_part(self, kind: str, instrumented: bool, args: tuple, placement=None):
    """The executable of one micro-batch's part of an accumulated step: ``"accumulate"``,
    ``"accumulate-only"`` (the step's only micro-batch, where that differs) or ``"ip"``
    (the JVP pass). ``args``: ``(params, aux, sums, batch, mask)``, placed by ``placement``."""
    make = {
        "accumulate": self._accumulate,
        "accumulate-only": lambda flag: self._accumulate(flag, only=True),
        "ip": lambda _: self._ip_layout,
    }[kind]
    out = None
    if placement is not None:  # sums and model state where they came in; sum_ip replicated
      out = (lambda: placement.replicated) if kind == "ip" else (lambda: (_shardings(args[2]), _shardings(args[1])))
    return self._compiled(kind, instrumented, make, args, () if kind == "ip" else (2,), out)

  def _accumulated_kinds(self, instrumented: bool, single: bool, rows: int) -> tuple[str, ...]:
    """The parts a micro-batch of ``rows`` runs in an accumulated step (``single``: the
    step's only one): accumulate -- as the only micro-batch where the estimator's groups
    or a same-pass ``sum_ip`` (:meth:`_same_pass_ip`) make it differ -- and, where the
    policy reads ``sum_ip`` and it does not come from the same pass, the JVP pass."""
    same_pass = self._same_pass_ip(instrumented, single, rows)
    only = single and instrumented and (self._estimated or same_pass)
    jvp = instrumented and self._with_ip and not same_pass
    return ("accumulate-only" if only else "accumulate", *(("ip",) if jvp else ()))

  def _instrumented(self, epoch: int | None, stats: bool | None) -> bool:
    if stats is not None:
      return bool(stats)
    if epoch is None:
      raise ValueError(
          "pass epoch= (the 0-based epoch of this step, for the policy's window) or "
          "stats=True/False to the step."
      )
    return bool(self.policy.needs_stats(epoch))

  # ------------------------------------------------------------------ public API

  def init(self, params: PyTree, aux: Any = None) -> TrainState:
    """The starting :class:`TrainState` (``tx.init(params)``) on copies of ``params`` and
    ``aux``: steps donate the state's buffers, and the caller's arrays stay usable (a
    second run from the same initial weights).

    Where ``params`` span several devices, the state is made by one compiled call whose
    outputs lie where :class:`~divebatch_jax.transform.placement.Placement` puts them:
    each parameter-shaped leaf (optimizer moments, the rule's sums) on its parameter's
    sharding, everything else replicated on the same mesh (never formed whole on one
    device first).
    """

    def fresh(params, aux):
      params, aux = jax.tree.map(jnp.copy, (params, aux))
      return TrainState(params, self.tx.init(params), aux)

    placement = Placement.of(params)
    if placement is None:
      return fresh(params, aux)
    shapes = jax.eval_shape(fresh, params, aux)
    out = TrainState(placement.kept(params), placement.shardings(shapes.opt_state), placement.kept(aux))
    params, aux = placement.place((params, aux))
    return jax.jit(fresh, out_shardings=out)(params, aux)

  def needs_stats(self, epoch: int) -> bool:
    """Whether steps of ``epoch`` are instrumented (the policy's window)."""
    return bool(self.policy.needs_stats(epoch))

  def __call__(
      self,
      state: TrainState,
      batch: PyTree,
      mask: jax.Array | None = None,
      *,
      epoch: int | None = None,
      stats: bool | None = None,
  ) -> tuple[TrainState, StepOutput]:
    """One update on ``batch`` (``(B, ...)`` or a ``(K, m, ...)`` layout) and its mask.

    Instrumented when ``stats`` is True, or when it is None and the policy's
    window includes ``epoch``. The state's buffers are donated: use the returned one.
    """
    executable, args = self._fused_call(state, batch, mask, self._instrumented(epoch, stats))
    return executable(*args)

  def executable(self, state: TrainState, batch: PyTree, mask: jax.Array | None = None, *,
                 epoch: int | None = None, stats: bool | None = None):
    """The compiled executable that :meth:`__call__` runs on these arguments (compiled now
    where it is not yet), to read its ``memory_analysis()`` or its HLO (``as_text()``)."""
    return self._fused_call(state, batch, mask, self._instrumented(epoch, stats))[0]

  def _fused_call(self, state, batch, mask, instrumented: bool):
    """``(executable, args)`` of one fused call, the arguments checked and placed."""
    if mask is None:
      mask = jnp.ones((kernel.batch_size_of(batch),), bool)
    if jnp.ndim(mask) == 1:
      kernel.resolve_mask(batch, mask)
    elif jnp.ndim(mask) != 2 or any(jnp.shape(x)[:2] != jnp.shape(mask) for x in jax.tree.leaves(batch)):
      raise ValueError(
          f"a step takes batch (B, ...) with mask (B,), or a (K, m, ...) layout with mask (K, m); "
          f"got mask {jnp.shape(mask)} and batch leaves {[jnp.shape(x) for x in jax.tree.leaves(batch)]}."
      )
    placement, (state,), (batch, mask) = placed(state.params, (_strong(state),), (batch, jnp.asarray(mask, bool)))
    args = (state, batch, mask)
    return self._compiled("fused", instrumented, self._fused, args, (0,), self._step_out(placement, state)), args

  def run(
      self, state: TrainState, batch, *, epoch: int | None = None, stats: bool | None = None
  ) -> tuple[TrainState, StepOutput]:
    """One update on a pipeline batch of any K: ``batch.micro_batches`` is a sequence of
    ``(data (m, ...), mask (m,))`` pairs (a :class:`divebatch_jax.data.Batch`).

    A step of one micro-batch is one fused call where :attr:`fuse` (GPU/TPU), else,
    like every step of K >= 2 micro-batches, :meth:`accumulate` per micro-batch and
    :meth:`apply`. Where the policy reads ``sum_ip``: from the same pass for a step of
    one micro-batch that a per-example method takes in one chunk
    (``accumulate(..., only=True)``), else :meth:`inner_products` per micro-batch, ḡ
    the step's mean gradient and the model state the step started from, as the fused
    call computes it. Instrumented as in :meth:`__call__`.
    """
    instrumented = self._instrumented(epoch, stats)
    parts = batch.micro_batches
    if self.fuse and len(parts) == 1:
      data, mask = parts[0]
      return self(state, data, mask, stats=instrumented)
    only = len(parts) == 1
    start, sums = state, None
    for data, mask in parts:
      sums, aux = self.accumulate(state, data, mask, sums, stats=instrumented, only=only)
      state = state._replace(aux=aux)
    sum_ip = None
    if self._same_pass_ip(instrumented, only, jnp.shape(parts[0][1])[0]):
      sum_ip = sums.sum_ip
    elif instrumented and self._with_ip:
      # Added eagerly as float32 pairs (a Python sum would start from a weakly typed 0: one
      # more small executable, compiled on the first step of several micro-batches).
      sum_ip = functools.reduce(operator.add, (self.inner_products(start, sums, data, mask) for data, mask in parts))
    return self.apply(state, sums, sum_ip=sum_ip, stats=instrumented)

  def zero_sums(self, params: PyTree) -> microbatch.StepSums:
    """The empty :class:`~divebatch_jax.stats.StepSums` to start :meth:`accumulate` from."""
    return self._zero(params)(params)

  def _zero(self, params):
    """The executable of :meth:`zero_sums` (its sums on the parameters' shardings where
    they span several devices)."""
    placement = Placement.of(params)
    out = None if placement is None else lambda: placement.shardings(jax.eval_shape(microbatch.zero_sums, params))
    return self._compiled("zero", False, lambda _: microbatch.zero_sums, (params,), (), out)

  def accumulate(
      self,
      state: TrainState,
      batch: PyTree,
      mask: jax.Array,
      sums: microbatch.StepSums | None = None,
      *,
      epoch: int | None = None,
      stats: bool | None = None,
      only: bool = False,
  ) -> tuple[microbatch.StepSums, Any]:
    """Adds one micro-batch ``(m, ...)`` (mask ``(m,)``) to ``sums``: ``(sums, aux)``.

    MultiSteps-style: a batch of any size is reached as several calls of a fixed
    device batch, one executable for all of them; :meth:`apply` then updates.
    ``aux`` is threaded from micro-batch to micro-batch (pass it back in
    ``state._replace(aux=aux)``). ``only``: this micro-batch is the step's only one,
    so the micro-batch estimator forms its groups within it, and where the policy
    reads ``sum_ip`` and a per-example method takes the micro-batch in one chunk,
    ``sums.sum_ip`` holds Σ_i <g_i, ḡ>² about its mean from the same pass, for
    ``apply(..., sum_ip=sums.sum_ip)`` (otherwise :meth:`inner_products` gives it).
    """
    instrumented = self._instrumented(epoch, stats)
    sums = self.zero_sums(state.params) if sums is None else sums
    args, placement = self._accumulated_args(state, sums, batch, mask)
    kind = self._accumulated_kinds(instrumented, only, jnp.shape(mask)[0])[0]
    return self._accumulated_part(kind, instrumented, args, placement)(*args)

  def _accumulated_args(self, state: TrainState, sums, batch, mask) -> tuple[tuple, Placement | None]:
    """``((params, aux, sums, batch, mask), placement)``, placed as :func:`placed` does."""
    placement, (aux, sums), (batch, mask) = placed(
        state.params, (state.aux, sums), (batch, jnp.asarray(mask, bool))
    )
    return (state.params, aux, sums, batch, mask), placement

  def inner_products(self, state: TrainState, sums: microbatch.StepSums, batch: PyTree, mask: jax.Array) -> jax.Array:
    """Σ_i <g_i, ḡ>² over one micro-batch ``(m, ...)`` (or a ``(K, m, ...)`` layout), ḡ
    the step's mean gradient from ``sums`` (a second pass, for policies that read
    ``sum_ip``; add over the micro-batches)."""
    args, placement = self._accumulated_args(state, sums, batch, mask)
    return self._accumulated_part("ip", True, args, placement)(*args)

  def apply(
      self,
      state: TrainState,
      sums: microbatch.StepSums,
      *,
      sum_ip: jax.Array | None = None,
      epoch: int | None = None,
      stats: bool | None = None,
  ) -> tuple[TrainState, StepOutput]:
    """The update from accumulated ``sums`` (instrumented as in :meth:`accumulate`)."""
    instrumented = self._instrumented(epoch, stats)
    sum_ip = jnp.float32(jnp.nan) if sum_ip is None else jnp.asarray(sum_ip, jnp.float32)
    placement, (state, sums), (sum_ip,) = placed(state.params, (_strong(state), sums), (sum_ip,))
    args = (state, sums, sum_ip)
    return self._compiled("apply", instrumented, self._apply, args, (0,), self._step_out(placement, state))(*args)

  def precompile(
      self, state: TrainState, *, layouts=(), micro_batch=None, instrumented=(False, True)
  ) -> int:
    """Compiles ahead of time what :meth:`run` needs on these shapes; returns how many.

    ``state`` and the shapes are ``jax.ShapeDtypeStruct`` trees (with shardings) or
    arrays. ``layouts``: ``(data, mask)`` pairs of the single micro-batches steps
    will see (``(b, ...)``, ``(b,)``), soonest first; ``micro_batch``: the pair of
    the device batch m when steps of K >= 2 micro-batches can occur; ``instrumented``:
    the plain and/or instrumented variants. Where :attr:`fuse`, ``layouts`` get the
    fused call; otherwise they, like ``micro_batch``, get :meth:`accumulate`, with
    :meth:`zero_sums` and :meth:`apply`, a layout of a step's only micro-batch
    ``accumulate(..., only=True)`` where that differs, and where the policy reads
    ``sum_ip`` and it does not come from the same pass, :meth:`inner_products`. Safe to call from a background thread while training
    runs: a step that needs an executable being compiled waits for it (that wait
    counts in ``executables.stall_seconds``, the compiles here do not).
    """
    layouts = list(layouts)
    fused, single = (layouts, []) if self.fuse else ([], layouts)
    device = [] if micro_batch is None else [micro_batch]
    with self.executables.ahead():
      return self._precompile(_strong(state), fused, single, device, instrumented)

  def _precompile(self, state, fused, single, device, instrumented) -> int:
    """``fused``: layouts of one-call steps; ``single``: of one-micro-batch steps run as
    accumulate + apply; ``device``: the device batch of steps of K >= 2 micro-batches.
    Every shape is placed as the calls will place their arrays (:func:`placed`)."""
    count = 0
    placement, (state,), _ = placed(state.params, (state,))
    for layout in fused:
      batch, mask = placed(state.params, (), layout)[2]
      for flag in instrumented:
        self._compiled("fused", flag, self._fused, (state, batch, mask), (0,), self._step_out(placement, state))
        count += 1
    if not single and not device:
      return count
    self._zero(state.params)
    # On one device zero_sums' outputs are constants that jax leaves uncommitted and moves
    # where the step runs: as shapes without a sharding they compile the same way. On
    # several devices they lie on the parameters' shardings, as the zero executable puts them.
    sums = jax.eval_shape(microbatch.zero_sums, state.params)
    _, (sums,), (scalar,) = placed(state.params, (sums,), (jax.ShapeDtypeStruct((), jnp.float32),))
    count += 1
    for flag in instrumented:  # every accumulated step ends with it
      self._compiled("apply", flag, self._apply, (state, sums, scalar), (0,), self._step_out(placement, state))
      count += 1
    seen = set()  # a layout of m rows may be listed again as the device batch
    for (batch, mask), one in [*((pair, True) for pair in single), *((pair, False) for pair in device)]:
      batch, mask = placed(state.params, (), (batch, mask))[2]
      for flag in instrumented:
        for kind in self._accumulated_kinds(flag, one, jnp.shape(mask)[0]):
          if (kind, flag, jnp.shape(mask)) not in seen:
            seen.add((kind, flag, jnp.shape(mask)))
            self._accumulated_part(kind, flag, (state.params, state.aux, sums, batch, mask), placement)
            count += 1
    return count


def train_step(loss_fn: Callable, tx: optax.GradientTransformation, **kwargs) -> TrainStep:
  """:class:`TrainStep` for ``loss_fn`` under ``tx`` (keyword arguments as there)."""
  return TrainStep(loss_fn, tx, **kwargs)
