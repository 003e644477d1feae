"""Classifiers in flax nnx and the pure bridge to the statistics kernel.

Every model maps ``x`` -- NHWC float images ``(B, H, W, C)`` or features
``(B, D)`` -- to logits ``(B, num_classes)`` and is called as
``model(x, train=..., mask=...)``:

* :class:`LogisticRegression`, :class:`MLP` flatten ``x`` to ``(B, D)``;
* :class:`SmallCNN`: three 3x3 convolutions (32, 64, 128 channels; 2x2 max-pool
  after the first two), global average pooling and a dense layer, about 95k
  parameters on 32x32x3 and on 8x8x1 alike;
* :class:`~divebatch_jax.train.gpt.GPT` (``gpt``, ``gpt-small``, ``gpt-10m``): a
  character language model, ``(B, T)`` token ids to ``(B, T, V)`` logits; its
  per-example loss is the mean over the window's T tokens;
* :class:`ResNet` with the CIFAR-style factories :func:`resnet20` (He et al.
  2016: 3 stages x 3 basic blocks, 16/32/64 channels, 0.27M parameters) and
  :func:`resnet18` (4 stages x 2 basic blocks, 64..512 channels, 3x3 stem and no
  max-pool as in the CIFAR code of the DiveBatch paper, 11.2M parameters).

Normalisation (``norm``) and per-example statistics. The kernel
(:func:`divebatch_jax.stats.gradient_stats`) needs a loss whose row ``i``
depends on example ``i`` only:

* ``"group"`` (GroupNorm, groups of >= 4 channels, at most 32 groups) and
  ``"none"`` normalise within one example: per-example gradients are defined and
  every method may use the model;
* ``"batch"`` (BatchNorm, PyTorch's momentum 0.1 and eps 1e-5) in train mode
  normalises with the batch's mean and variance, so every example's loss depends
  on the others and a per-example gradient is not defined. The bridge refuses a
  train-mode ``loss_fn(params, batch)`` for such models
  (:func:`per_example_loss_fn`); they train through :func:`aux_loss_fn`, which
  threads the running averages, and their statistics come from micro-batch
  gradients (each micro-batch normalised over its own real rows; see
  docs/sharp_edges.md). The batch statistics use the real rows only (``mask``),
  so padding a batch to a bucket size does not change the real rows' outputs. In
  eval mode BatchNorm uses the running averages and rows are independent again.

The bridge. :func:`split_model` turns a model into ``(graphdef, params, rest)``
(``params`` the :class:`flax.nnx.Param` state, ``rest`` everything else, e.g.
BatchNorm's running averages); :func:`forward`, :func:`per_example_losses`,
:func:`per_example_loss_fn` and :func:`correct_count` are pure functions of those
(jittable, no mutation of their inputs). The kernel's Σ||g_i||² on an MLP (8x8 images,
flattened) against one ``jax.grad`` per example::

    >>> import jax, jax.numpy as jnp, optax
    >>> from divebatch_jax import gradient_stats
    >>> from divebatch_jax.train import models
    >>> model = models.create_model("mlp", input_shape=(8, 8, 1), num_classes=10, seed=0, hidden_sizes=(16,))
    >>> graphdef, params, rest = models.split_model(model)
    >>> loss_fn = models.per_example_loss_fn(graphdef, rest)
    >>> batch = {"x": jax.random.normal(jax.random.key(0), (4, 8, 8, 1)), "y": jnp.arange(4)}
    >>> loss, grad, stats = jax.jit(gradient_stats, static_argnums=0)(loss_fn, params, batch)
    >>> def sq_norm(x, y):                        # ||g_i||² of one example, by jax.grad
    ...   one = {"x": x[None], "y": y[None]}
    ...   return optax.tree_utils.tree_norm(jax.grad(lambda p: loss_fn(p, one)[0])(params)) ** 2
    >>> brute_force = jax.jit(jax.vmap(sq_norm))(batch["x"], batch["y"]).sum()
    >>> int(stats.count), bool(jnp.isclose(stats.sum_sq, brute_force, rtol=1e-4))
    (4, True)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from divebatch_jax.stats.kernel import resolve_mask
from divebatch_jax.train.gpt import GPT, GPT_SIZES, with_axes

PyTree = Any

MODEL_NAMES = ("logreg", "mlp", "cnn", "resnet20", "resnet18", *GPT_SIZES)
NORMS = ("batch", "group", "layer", "none")
DEFAULT_MLP_HIDDEN = (256, 256)

_BATCH_NORM_MOMENTUM = 0.9  # PyTorch's momentum=0.1 in flax's convention.
_NORM_EPSILON = 1e-5
_MAX_GROUPS = 32
_MIN_CHANNELS_PER_GROUP = 4
_he_normal = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _check_norm(norm: str) -> str:
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
  return norm


def group_count(channels: int) -> int:
  """GroupNorm groups for ``channels``: groups of >= 4 channels, at most 32 groups.

  ``gcd(channels, min(32, max(1, channels // 4)))``; e.g. 16 -> 4, 64 -> 16, 512 -> 32.
  """
  return math.gcd(channels, min(_MAX_GROUPS, max(1, channels // _MIN_CHANNELS_PER_GROUP)))


class Norm(nnx.Module):
  """BatchNorm, GroupNorm, LayerNorm (each pixel over its channels, as ConvNeXt) or the
  identity, over the last (channel) axis.

  ``train`` and ``mask`` only matter for BatchNorm: in train mode it normalises
  with the statistics of the rows where ``mask`` is True (all rows when None) and
  updates its running averages; in eval mode it uses the running averages.
  """

  def __init__(self, norm: str, channels: int, *, rngs: nnx.Rngs):
    self.kind = _check_norm(norm)
    if norm == "batch":
      self.layer = nnx.BatchNorm(
          channels, momentum=_BATCH_NORM_MOMENTUM, epsilon=_NORM_EPSILON, rngs=rngs
      )
    elif norm == "group":
      self.layer = nnx.GroupNorm(
          channels, num_groups=group_count(channels), epsilon=_NORM_EPSILON, rngs=rngs
      )
    elif norm == "layer":
      self.layer = nnx.LayerNorm(channels, epsilon=_NORM_EPSILON, rngs=rngs)
    else:
      self.layer = None

  def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None) -> jax.Array:
    if self.kind == "batch":
      row_mask = None if mask is None else mask.reshape(mask.shape + (1,) * (x.ndim - 1))
      return self.layer(x, use_running_average=not train, mask=row_mask)
    if self.kind in ("group", "layer"):
      return self.layer(x)
    return x


def _conv(in_ch, out_ch, kernel, stride, norm, rngs, *, zero_init=False) -> nnx.Conv:
  """A conv with PyTorch's padding (k // 2); bias only when no norm follows. Logical axes
  (flax's partitioning metadata): ``(None, None, "conv_in", "conv_out")``."""
  pad = kernel // 2
  return nnx.Conv(
      in_ch,
      out_ch,
      kernel_size=(kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      use_bias=norm == "none",
      kernel_init=with_axes(nnx.initializers.zeros_init() if zero_init else _he_normal, None, None, "conv_in", "conv_out"),
      bias_init=with_axes(nnx.initializers.zeros_init(), "conv_out"),
      rngs=rngs,
  )


def _head(features: int, num_classes: int, rngs: nnx.Rngs) -> nnx.Linear:
  """A CNN's dense classifier; logical axes ``("conv_in", None)`` (its input is the last
  conv's channels)."""
  return nnx.Linear(features, num_classes, kernel_init=with_axes(nnx.initializers.lecun_normal(), "conv_in", None), rngs=rngs)


def set_compute_dtype(model: nnx.Module, dtype) -> nnx.Module:
  """Sets the compute ``dtype`` of every layer of ``model`` (``jnp.bfloat16``: matmuls,
  convolutions and norms in bf16; the parameters stay float32). Returns ``model``."""
  for _, module in nnx.iter_modules(model):
    if hasattr(module, "dtype"):
      module.dtype = dtype
  return model


def _check_floating(x: jax.Array) -> None:
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise TypeError(
        f"x must be a floating array (normalise images first), got {jnp.result_type(x)}."
    )


def _flatten_features(x: jax.Array, in_features: int) -> jax.Array:
  _check_floating(x)
  if x.ndim < 2 or math.prod(x.shape[1:]) != in_features:
    raise ValueError(
        f"x must have shape (B, ...) with {in_features} features per example, got {x.shape}."
    )
  return x.reshape(x.shape[0], in_features)


def _check_images(x: jax.Array, channels: int) -> None:
  _check_floating(x)
  if x.ndim != 4 or x.shape[-1] != channels:
    raise ValueError(f"x must be NHWC images with {channels} channels, got shape {x.shape}.")


class LogisticRegression(nnx.Module):
  """Multinomial logistic regression: logits = flatten(x) W + b."""

  def __init__(self, in_features: int, num_classes: int, *, rngs: nnx.Rngs):
    self.in_features = in_features
    self.linear = nnx.Linear(in_features, num_classes, rngs=rngs)

  def __call__(self, x, *, train: bool = False, mask: jax.Array | None = None):
    del train, mask  # no normalisation: rows are independent in both modes
    return self.linear(_flatten_features(x, self.in_features))


class MLP(nnx.Module):
  """ReLU multi-layer perceptron on flatten(x) with hidden widths ``hidden_sizes``."""

  def __init__(
      self, in_features: int, hidden_sizes: Sequence[int], num_classes: int, *, rngs: nnx.Rngs
  ):
    if not hidden_sizes or any(int(h) < 1 for h in hidden_sizes):
      raise ValueError(
          f"hidden_sizes must be a non-empty list of positive ints, got {hidden_sizes!r}."
      )
    self.in_features = in_features
    widths = (in_features, *map(int, hidden_sizes))
    self.hidden = nnx.List(
        [nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])]
    )
    self.out = nnx.Linear(widths[-1], num_classes, rngs=rngs)

  def __call__(self, x, *, train: bool = False, mask: jax.Array | None = None):
    del train, mask
    h = _flatten_features(x, self.in_features)
    for layer in self.hidden:
      h = nnx.relu(layer(h))
    return self.out(h)


class SmallCNN(nnx.Module):
  """conv3x3(32)-pool-conv3x3(64)-pool-conv3x3(128)-global mean-dense.

  Each conv is followed by ``norm`` and a ReLU. Global average pooling makes the
  parameter count independent of the image size (any H, W >= 4).
  """

  def __init__(
      self,
      in_channels: int,
      num_classes: int,
      *,
      channels: Sequence[int] = (32, 64, 128),
      norm: str = "none",
      rngs: nnx.Rngs,
  ):
    _check_norm(norm)
    self.in_channels = in_channels
    widths = (in_channels, *channels)
    self.convs = nnx.List([_conv(a, b, 3, 1, norm, rngs) for a, b in zip(widths[:-1], widths[1:])])
    self.norms = nnx.List([Norm(norm, c, rngs=rngs) for c in channels])
    self.out = _head(widths[-1], num_classes, rngs)

  def __call__(self, x, *, train: bool = False, mask: jax.Array | None = None):
    _check_images(x, self.in_channels)
    last = len(self.convs) - 1
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
      x = nnx.relu(norm(conv(x), train=train, mask=mask))
      if i < last:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    return self.out(jnp.mean(x, axis=(1, 2)))


class BasicBlock(nnx.Module):
  """relu(norm(conv3x3(relu(norm(conv3x3(x))))) + shortcut(x)).

  The shortcut is the identity, or a strided 1x1 conv + norm where the shape
  changes. With ``norm="none"`` the block's second conv starts at zero (Fixup-
  style), so the un-normalised network starts as a stable identity stack.
  """

  def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str, *, rngs: nnx.Rngs):
    self.conv1 = _conv(in_ch, out_ch, 3, stride, norm, rngs)
    self.norm1 = Norm(norm, out_ch, rngs=rngs)
    self.conv2 = _conv(out_ch, out_ch, 3, 1, norm, rngs, zero_init=norm == "none")
    self.norm2 = Norm(norm, out_ch, rngs=rngs)
    if stride != 1 or in_ch != out_ch:
      self.shortcut = _conv(in_ch, out_ch, 1, stride, norm, rngs)
      self.shortcut_norm = Norm(norm, out_ch, rngs=rngs)
    else:
      self.shortcut = None
      self.shortcut_norm = None

  def __call__(self, x, *, train: bool, mask: jax.Array | None):
    y = nnx.relu(self.norm1(self.conv1(x), train=train, mask=mask))
    y = self.norm2(self.conv2(y), train=train, mask=mask)
    if self.shortcut is not None:
      x = self.shortcut_norm(self.shortcut(x), train=train, mask=mask)
    return nnx.relu(y + x)


class ResNet(nnx.Module):
  """CIFAR-style ResNet: 3x3 stem, stages of basic blocks, global mean, dense.

  Stage ``s`` has ``stage_blocks[s]`` blocks of ``stage_channels[s]`` channels;
  every stage after the first halves the resolution in its first block.
  """

  def __init__(
      self,
      stage_blocks: Sequence[int],
      stage_channels: Sequence[int],
      num_classes: int,
      *,
      in_channels: int = 3,
      norm: str = "group",
      rngs: nnx.Rngs,
  ):
    if len(stage_blocks) != len(stage_channels) or not stage_blocks:
      raise ValueError(
          "stage_blocks and stage_channels must be non-empty and of equal length, got "
          f"{stage_blocks!r} and {stage_channels!r}."
      )
    _check_norm(norm)
    self.in_channels = in_channels
    self.stem = _conv(in_channels, stage_channels[0], 3, 1, norm, rngs)
    self.stem_norm = Norm(norm, stage_channels[0], rngs=rngs)
    blocks = []
    width = stage_channels[0]
    for s, (count, channels) in enumerate(zip(stage_blocks, stage_channels)):
      for b in range(count):
        stride = 2 if s > 0 and b == 0 else 1
        blocks.append(BasicBlock(width, channels, stride, norm, rngs=rngs))
        width = channels
    self.blocks = nnx.List(blocks)
    self.out = _head(width, num_classes, rngs)

  def __call__(self, x, *, train: bool = False, mask: jax.Array | None = None):
    _check_images(x, self.in_channels)
    x = nnx.relu(self.stem_norm(self.stem(x), train=train, mask=mask))
    for block in self.blocks:
      x = block(x, train=train, mask=mask)
    return self.out(jnp.mean(x, axis=(1, 2)))


def resnet20(
    num_classes: int, *, in_channels: int = 3, norm: str = "group", rngs: nnx.Rngs
) -> ResNet:
  """ResNet-20 (He et al. 2016, CIFAR): 3 stages x 3 blocks, 16/32/64 channels."""
  return ResNet((3, 3, 3), (16, 32, 64), num_classes, in_channels=in_channels, norm=norm, rngs=rngs)


def resnet18(
    num_classes: int, *, in_channels: int = 3, norm: str = "group", rngs: nnx.Rngs
) -> ResNet:
  """ResNet-18, CIFAR variant: 4 stages x 2 blocks, 64/128/256/512 channels."""
  return ResNet(
      (2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels=in_channels, norm=norm, rngs=rngs
  )


def _positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return value


def create_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    seed: int,
    norm: str | None = None,
    hidden_sizes: Sequence[int] | None = None,
    remat: bool = False,
    dtype: Any = None,
) -> nnx.Module:
  """Builds model ``name`` for examples of shape ``input_shape`` (no batch axis).

  Args:
    name: one of ``MODEL_NAMES``: logreg, mlp, cnn, resnet20, resnet18, gpt,
      gpt-small, gpt-10m.
    input_shape: one example's shape, e.g. ``(32, 32, 3)`` (HWC, needed by cnn and
      the resnets), ``(64,)``, or ``(T,)`` token windows for the GPTs (T is their context).
    num_classes: number of logits, >= 1 (the vocabulary size for the GPTs).
    seed: initialisation seed (same seed, same parameters).
    norm: ``"batch"``, ``"group"`` or ``"none"``; None means ``"group"`` for the
      resnets and ``"none"`` otherwise. logreg and mlp accept ``"none"`` only.
    hidden_sizes: the mlp's hidden widths (default ``(256, 256)``); mlp only.
    remat: rematerialise each block (``nnx.remat``); the GPTs only.
    dtype: the compute dtype (:func:`set_compute_dtype`), e.g. ``"bfloat16"``; None
      or ``"float32"``: float32.

  Example (an MLP with one hidden layer of 32: 64·32 + 32 + 32·10 + 10 parameters)::

    >>> import jax, jax.numpy as jnp
    >>> model = create_model("mlp", input_shape=(64,), num_classes=10, seed=0, hidden_sizes=(32,))
    >>> graphdef, params, rest = split_model(model)
    >>> sum(leaf.size for leaf in jax.tree.leaves(params)), model(jnp.zeros((2, 64)), train=False).shape
    (2410, (2, 10))
    >>> create_model("mlp", input_shape=(64,), num_classes=10, seed=0, norm="batch")
    Traceback (most recent call last):
    ...
    ValueError: norm must be 'none' (or None) for 'mlp', got 'batch'.
  """
  if name not in MODEL_NAMES:
    raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}.")
  shape = tuple(input_shape)
  if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
    raise ValueError(
        f"input_shape must be a non-empty tuple of positive ints, got {input_shape!r}."
    )
  _positive_int("num_classes", num_classes)
  if hidden_sizes is not None and name != "mlp":
    raise ValueError(f"hidden_sizes applies to the mlp only, got it for {name!r}.")
  if remat and name not in GPT_SIZES:
    raise ValueError(f"remat applies to the GPTs {tuple(GPT_SIZES)} only, got it for {name!r}.")
  model = _create(name, shape, num_classes, seed, norm, hidden_sizes, remat)
  if dtype not in (None, "float32", jnp.float32):
    set_compute_dtype(model, jnp.dtype(dtype))
  return model


def _create(name, shape, num_classes, seed, norm, hidden_sizes, remat) -> nnx.Module:
  if name in GPT_SIZES:
    if len(shape) != 1 or norm not in (None, "none"):
      raise ValueError(f"{name!r} takes (T,) token windows and norm None, got {shape}, norm={norm!r}.")
    return GPT(GPT_SIZES[name]._replace(context=shape[0], remat=remat), vocab_size=num_classes, seed=seed)
  is_resnet = name.startswith("resnet")
  norm = _check_norm(("group" if is_resnet else "none") if norm is None else norm)
  rngs = nnx.Rngs(seed)
  if name in ("logreg", "mlp"):
    if norm != "none":
      raise ValueError(f"norm must be 'none' (or None) for {name!r}, got {norm!r}.")
    features = math.prod(shape)
    if name == "logreg":
      return LogisticRegression(features, num_classes, rngs=rngs)
    hidden = DEFAULT_MLP_HIDDEN if hidden_sizes is None else hidden_sizes
    return MLP(features, hidden, num_classes, rngs=rngs)
  if len(shape) != 3 or min(shape[:2]) < 4:
    raise ValueError(f"input_shape must be (H, W, C) with H, W >= 4 for {name!r}, got {shape}.")
  if name == "cnn":
    return SmallCNN(shape[-1], num_classes, norm=norm, rngs=rngs)
  factory = resnet20 if name == "resnet20" else resnet18
  return factory(num_classes, in_channels=shape[-1], norm=norm, rngs=rngs)


def uses_batch_norm(model: nnx.Module) -> bool:
  """Whether any submodule is a BatchNorm (rows coupled in train mode)."""
  return any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(model))


def param_count(params: PyTree) -> int:
  """Number of scalars in a parameter pytree (concrete or abstract)."""
  return sum(math.prod(jnp.shape(p)) for p in jax.tree.leaves(params))


# --------------------------------------------------------------------------- bridge


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """``(graphdef, params, rest)``: the static structure, the ``nnx.Param`` state and
  everything else (BatchNorm's running averages; empty for the other norms)."""
  return nnx.split(model, nnx.Param, ...)


def _has_batch_stats(rest: nnx.State) -> bool:
  variables = jax.tree.leaves(rest, is_leaf=lambda v: isinstance(v, nnx.Variable))
  return any(isinstance(v, nnx.BatchStat) for v in variables)


def forward(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    x: jax.Array,
    *,
    train: bool,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, nnx.State]:
  """Pure forward pass: ``(logits, new_rest)``.

  In train mode BatchNorm normalises with the statistics of the real rows
  (``mask``, bool (B,); all rows when None) and ``new_rest`` holds the updated
  running averages; in eval mode ``new_rest`` equals ``rest``. The inputs are
  never mutated.
  """
  model = nnx.merge(graphdef, params, rest, copy=True)
  logits = model(x, train=train, mask=mask)
  return logits, nnx.state(model, nnx.Not(nnx.Param))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy ``logsumexp(z_i) - z_i[y_i]`` in float32, (B,).

  With per-token labels ``(B, T)`` and logits ``(B, T, V)``, row i's loss is the mean
  over its T tokens, ``(1/T) Σ_t (logsumexp(z_it) - z_it[y_it])`` (nats per token).
  """
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise TypeError(f"labels must be integer class ids, got {jnp.result_type(labels)}.")
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return losses.reshape(losses.shape[0], -1).mean(axis=1)


def _unpack(batch: PyTree) -> tuple[jax.Array, jax.Array]:
  if not isinstance(batch, dict) or "x" not in batch or "y" not in batch:
    raise ValueError(f"batch must be a dict with keys 'x' and 'y', got {type(batch).__name__} "
                     f"with keys {sorted(batch) if isinstance(batch, dict) else None}.")
  return batch["x"], batch["y"]


def per_example_losses(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    batch: dict,
    *,
    train: bool,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, nnx.State]:
  """Per-example cross-entropy of ``batch = {"x", "y"}`` and the new ``rest``.

  The training path for BatchNorm models (schedule methods): differentiate
  ``Σ_i mask_i · loss_i`` with ``has_aux`` to keep the updated running averages.
  """
  x, y = _unpack(batch)
  logits, new_rest = forward(graphdef, params, rest, x, train=train, mask=mask)
  return cross_entropy(logits, y), new_rest


def per_example_loss_fn(
    graphdef: nnx.GraphDef, rest: nnx.State, *, train: bool = True
) -> Callable[[nnx.State, dict], jax.Array]:
  """``loss_fn(params, batch) -> (B,)`` per-example cross-entropy, for the kernel.

  Row ``i`` depends on example ``i`` only. Refused for BatchNorm models in train
  mode (rows coupled, running averages would be dropped): use
  :func:`per_example_losses`, or ``train=False`` for their eval-mode loss.
  """
  if train and _has_batch_stats(rest):
    raise ValueError(
        "per_example_loss_fn(train=True) is not defined for BatchNorm models: batch "
        "statistics couple the examples. Use norm='group' or 'none' for per-example "
        "statistics, or per_example_losses(..., train=True) for a plain training step."
    )

  def loss_fn(params: nnx.State, batch: dict) -> jax.Array:
    return per_example_losses(graphdef, params, rest, batch, train=train)[0]

  return loss_fn


def aux_loss_fn(graphdef: nnx.GraphDef) -> Callable:
  """``loss_fn(params, rest, batch, mask) -> (losses, new_rest)`` in train mode: the
  loss with auxiliary state (BatchNorm's running averages, normalised over the
  real rows of ``batch``) for :class:`divebatch_jax.transform.TrainStep` (``has_aux``)."""

  def loss_fn(params: nnx.State, rest: nnx.State, batch: dict, mask: jax.Array):
    return per_example_losses(graphdef, params, rest, batch, train=True, mask=mask)

  return loss_fn


def eval_sums(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    batch: dict,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """``(hits, loss sum)`` over the real rows in eval mode: the float32 sum over rows of
  the share of the row's labels (1, or T per-token ones) its argmax logits get right
  (for class labels: the count of correct rows), and the float32 sum of the rows'
  cross-entropies."""
  x, y = _unpack(batch)
  real = resolve_mask(batch, mask)
  logits, _ = forward(graphdef, params, rest, x, train=False)
  right = (jnp.argmax(logits, axis=-1) == y).reshape(y.shape[0], -1).mean(axis=1)
  losses = jnp.where(real, cross_entropy(logits, y), 0.0)
  return jnp.sum(jnp.where(real, right, 0.0)), jnp.sum(losses)


def correct_count(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    batch: dict,
    mask: jax.Array | None = None,
) -> jax.Array:
  """int32 number of real rows whose eval-mode argmax logit equals the label."""
  return eval_sums(graphdef, params, rest, batch, mask)[0].astype(jnp.int32)
