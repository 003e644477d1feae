"""Training configurations as data: one frozen dataclass and named presets.

A :class:`TrainConfig` is everything a run needs; the CLI builds one from flags
(a ``--preset`` first, then explicit flags on top) and :func:`validate` checks
it, raising one clear message that names the flag and what it accepts.

Presets reproduce the DiveBatch paper's settings (ALGORITHMS.md §1) and give
CPU-sized runs for this project's machines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import typing
from typing import Any, Iterator, Sequence

from divebatch_jax.data.sources import DATA_DIR_ENV
from divebatch_jax.stats import METHODS as STATS_METHODS
from divebatch_jax.transform.lr_rules import LR_RULES
from divebatch_jax.transform.policies.divebatch import ESTIMATORS
from divebatch_jax.train.models import MODEL_NAMES as MODELS
from divebatch_jax.train.models import NORMS
from divebatch_jax.train import methods

DATASETS = ("synthetic", "digits", "cifar10", "tinyshakespeare")  # plus "tfds:NAME", "npz:PATH", "text:PATH"
DATASET_PREFIXES = ("tfds:", "npz:", "text:")
OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad")
RAMP_UNDER_LR_RULE = 50  # --lr-ramp-steps when unset and --lr-rule is not "none"

# Defaults that learn, per data set (--model unset) and per model (--lr unset); a tfds:NAME
# image data set gets the CNN, an npz:PATH file the MLP.
DEFAULT_MODELS = {"synthetic": "mlp", "digits": "mlp", "cifar10": "cnn", "tfds:*": "cnn", "npz:*": "mlp",
                  "tinyshakespeare": "gpt", "text:*": "gpt"}
DEFAULT_LR = {"cnn": 0.01,  # 2 epochs on 2,000 CIFAR-10 images: 23.6% (0.05: 15.3%, chance)
              "gpt": 3e-3, "gpt-small": 1e-3, "gpt-10m": 1e-3}  # AdamW rates of small char GPTs
TEXT_DECISION_STEPS = 100  # text data: --resize-every-steps when unset (an LM epoch is a whole corpus)
FALLBACK_LR = 0.05
SCHEDULES = ("constant", "cosine", "multistep", "step", "cosine-examples")
LR_BATCH_COUPLINGS = ("none", "replace")


class ConfigError(ValueError):
  """A bad flag or value; its message names the flag and what is accepted."""


@contextlib.contextmanager
def user_errors(what: str) -> Iterator[None]:
  """A library ValueError raised inside (a bad data file, a damaged checkpoint, a model
  that does not fit the data) becomes a :class:`ConfigError` prefixed with ``what``, the
  flag or file it concerns; the CLI prints those as one line. Wrap only the calls that
  check what the user gave: any other error is a bug and keeps its traceback.

      with user_errors("--dataset npz:mine.npz"):
        data = load_dataset(config)
  """
  try:
    yield
  except ConfigError:
    raise
  except ValueError as err:
    raise ConfigError(f"{what}: {err}") from err


SEED_LIMIT = 2**63  # --seed in [0, 2**63): it seeds NumPy and JAX as a signed 64-bit integer
# Longest file name and path the CLI accepts (Linux's NAME_MAX and PATH_MAX).
NAME_MAX, PATH_MAX = 255, 4096


def _path_problem(flag: str, path: str | None) -> str | None:
  """Why ``path`` cannot name a file (None: it can): too long as a whole or in one part."""
  if path is None:
    return None
  try:
    path.encode("utf-8")
  except UnicodeEncodeError:
    return f"{flag} must be UTF-8 text, got {path!r} (it holds bytes that are not): choose a plain name."
  if len(path.encode()) >= PATH_MAX:
    return f"{flag} is {len(path.encode())} bytes long; paths must be shorter than {PATH_MAX}."
  longest = max(path.split("/"), key=lambda part: len(part.encode()))
  if len(longest.encode()) > NAME_MAX:
    return f"{flag}: the name {longest[:40]!r}... is {len(longest.encode())} bytes long; names must be at most {NAME_MAX}."
  return None


# The --help groups, in order; each field's metadata names its group.
GROUPS = {
    "data": "data",
    "model": "model",
    "optimizer": "optimizer and learning rate",
    "rule": "batch-size rule (--method)",
    "divebatch": "DiveBatch",
    "schedules": "AdaBatch / SEBS / linear-ramp / Seesaw (its α: --growth-factor)",
    "tests": "norm / inner-product tests, noise scale, goodput",
    "layout": "batch layout and compilation",
    "run": "run, output and logging",
}


def flag_name(field: str) -> str:
  """The CLI flag of the :class:`TrainConfig` field ``field``.

  >>> flag_name("max_batch_size")
  '--max-batch-size'
  """
  return "--" + field.replace("_", "-")


def option(default: Any, help: str, *, group: str, choices: Sequence[str] | None = None,
           default_text: str | None = None, metavar: str | None = None) -> Any:
  """A :class:`TrainConfig` field with its CLI flag described once.

  ``help`` is the flag's help text, ``group`` a key of :data:`GROUPS`,
  ``choices`` the accepted names, ``default_text`` what ``--help`` says instead
  of ``default`` where that is ``None`` ("chosen per data set", ...), ``metavar``
  the value's name in ``--help``. Adding a flag is one field::

      >>> import dataclasses
      >>> @dataclasses.dataclass(frozen=True)
      ... class Config:
      ...   warmup_steps: int = option(0, "steps of linear lr warm-up", group="optimizer")
      >>> (field,) = dataclasses.fields(Config)
      >>> field.default, field.metadata["help"], field.metadata["group"]
      (0, 'steps of linear lr warm-up', 'optimizer')
  """
  if group not in GROUPS:
    raise ValueError(f"group must be one of {sorted(GROUPS)}, got {group!r}.")
  metadata = dict(help=help, group=group, choices=None if choices is None else tuple(choices),
                  default_text=default_text, metavar=metavar)
  return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run. Field names match the CLI flags (``--max-batch-size`` ...);
  each field's metadata holds its flag's help text and group (:func:`option`)."""

  # data
  dataset: str = option(
      "digits", f"{', '.join(DATASETS)}, tfds:NAME, npz:PATH or text:PATH", group="data", metavar="NAME")
  data_dir: str | None = option(
      None, "TFDS data directory", group="data", metavar="DIR",
      default_text=f"${DATA_DIR_ENV}, else ../shared/data/tfds beside a source checkout")
  num_examples: int | None = option(
      None, "training examples (the generated size, or a seeded subset)", group="data", default_text="all")
  num_test_examples: int | None = option(None, "test examples (a seeded subset)", group="data", default_text="all")
  augment: bool | None = option(None, "random crop + flip", group="data", default_text="on for image data sets")
  context: int | None = option(
      None, "text data: tokens per window", group="data", default_text="the GPT's context, else 64")
  # model
  model: str | None = option(
      None, "the network", group="model", choices=MODELS,
      default_text=f"per data set: {', '.join(f'{k} -> {v}' for k, v in DEFAULT_MODELS.items())}")
  norm: str | None = option(
      None, "normalisation of cnn / resnets", group="model", choices=NORMS,
      default_text="the model's own: group for resnets")
  remat: bool = option(False, "rematerialise the GPT's blocks (jax.checkpoint): less memory, more compute",
                       group="model")
  dtype: str = option("float32", "the models' compute dtype (parameters stay float32)", group="model",
                      choices=("float32", "bfloat16"))
  # optimizer
  lr: float | None = option(
      None, "base learning rate", group="optimizer",
      default_text=f"per model: {', '.join(f'{k} {v}' for k, v in DEFAULT_LR.items())}, else {FALLBACK_LR}")
  lr_rule: str = option("none", "how the lr follows the batch size", group="optimizer", choices=LR_RULES)
  max_lr_scale: float | None = option(None, "cap on the lr rule's scale", group="optimizer", default_text="none")
  lr_ramp_steps: int | None = option(
      None, "steps over which the lr scale follows a batch-size change (0: at once)", group="optimizer",
      default_text=f"{RAMP_UNDER_LR_RULE} under --lr-rule linear/sqrt/adascale, else 0")
  # (50 kept a ×5 resize from collapsing a run under an lr rule, benchmarks/RESULTS.md protocol A;
  # 0 under --lr-rule none, so that AdaBatch's --lr-factor applies at once, as in its paper.)
  optimizer: str = option("sgd", "inner optimizer", group="optimizer", choices=OPTIMIZERS)
  momentum: float = option(0.9, "SGD momentum", group="optimizer")
  weight_decay: float = option(5e-4, "decoupled weight decay", group="optimizer")
  schedule: str = option(
      "constant", "learning-rate schedule (per epoch; cosine-examples: a cosine over the run's examples, per step)",
      group="optimizer", choices=SCHEDULES)
  warmup_steps: int = option(0, "linear learning-rate warmup over this many optimizer steps", group="optimizer")
  clip_norm: float | None = option(
      None, "clip the batch gradient to this global norm first", group="optimizer", default_text="none")
  schedule_milestones: tuple[int, ...] = option(
      (), "multistep / step: the epochs at which the lr is multiplied by --schedule-gamma, increasing",
      group="optimizer", metavar="EPOCH", default_text="none")
  schedule_gamma: float = option(0.1, "multistep / step: the lr factor at each milestone, in (0, 1]", group="optimizer")
  lr_batch_coupling: str | None = option(
      None, "replace: a batch increase by r takes the place of the schedule's lr decay by r "
      "(√r under adam / adagrad); the lr is lr·min(d·S^p, 1), S = b/b0, d the schedule's decay",
      group="optimizer", choices=LR_BATCH_COUPLINGS, default_text="replace for seesaw, else none")
  # the rule
  method: str = option("divebatch", "batch-size rule", group="rule", choices=methods.NAMES)
  epochs: int = option(30, "training epochs", group="rule")
  batch_size: int = option(16, "initial batch size b0", group="rule")
  max_batch_size: int = option(512, "largest batch size b_max", group="rule")
  # DiveBatch. Without --delta or --first-resize, DiveBatch sets δ at its first resize so that
  # it asks for 4·b0 (benchmarks/RESULTS.md: the paper's δ = 0.1 jumps to b_max and loses accuracy).
  delta: float | None = option(
      None, "δ in b = δ·n·Δ̂ (docs/choosing_delta.md)", group="divebatch",
      default_text="set at the first resize to ask for min(4·b0, b_max)")
  resize_every: int = option(5, "epochs between resizes", group="divebatch")
  estimator: str = option("epoch", "how Δ̂ is estimated", group="divebatch", choices=ESTIMATORS)
  first_resize: int | None = option(
      None, "instead of --delta: the batch size the first resize asks for", group="divebatch",
      default_text="min(4·b0, b_max) without --delta")
  allow_decrease: bool = option(False, "the batch may shrink at a resize", group="divebatch")
  resize_every_steps: int | None = option(
      None, "DiveBatch / AdaBatch / SEBS: decide every N optimizer steps instead of every "
      "--resize-every / --growth-every epochs (a one-epoch language-model run)", group="divebatch",
      default_text="100 for text data, else none: by epochs")
  # AdaBatch / SEBS
  growth_factor: float = option(2.0, "AdaBatch factor / SEBS ρ", group="schedules")
  growth_every: int = option(5, "epochs between increases", group="schedules")
  lr_factor: float = option(1.0, "AdaBatch: lr multiplier per increase", group="schedules")
  ramp_examples: int | None = option(
      None, "linear-ramp: examples over which b0 grows to b_max", group="schedules",
      default_text="the first half of the run's epochs")
  ramp_increment: int | None = option(None, "linear-ramp: batch-size increment", group="schedules", default_text="b0")
  # cbs-warmup (critical-batch-size warmup)
  cbs_file: str | None = option(
      None, "cbs-warmup: a cbs.json of divebatch-train cbs (the critical batch size against examples)",
      group="schedules", metavar="FILE", default_text="none (required by cbs-warmup)")
  cbs_fit: str = option("measured", "cbs-warmup: follow the measured points (interpolated) or a power-law fit",
                        group="schedules", choices=("measured", "power"))
  # adaptive-sampling tests / noise scale
  eta: float = option(0.5, "norm test η", group="tests")
  theta: float = option(0.5, "inner-product test θ", group="tests")
  nu: float | None = option(1.0, "orthogonality ν (augmented inner-product test)", group="tests")
  test_every: int = option(10, "steps between test / noise-scale / goodput decisions", group="tests")
  noise_target_scale: float = option(1.0, "noise scale: target multiple of B_simple", group="tests")
  # layout and compilation
  stats_method: str = option("auto", "per-example statistics method", group="layout", choices=STATS_METHODS)
  max_device_batch: int | None = option(
      None, "upper bound of the device batch", group="layout", default_text="--max-batch-size")
  device_batch: int | None = option(
      None, "rows per call of the step", group="layout", default_text="the fastest, measured once per machine")
  round_batch: bool = option(True, "round the rule's batch sizes to sizes laid out without padding", group="layout")
  compilation_cache: str | None = option(
      None, "JAX persistent compilation cache directory, so a resumed run compiles nothing ('off': none)",
      group="layout", metavar="DIR", default_text="OUT/compilation_cache")
  eval_batch_size: int = option(1000, "rows per evaluation call", group="layout")
  # run
  seed: int = option(0, "random seed (initialisation, order, augmentation)", group="run")
  out: str = option("runs/default", "output directory", group="run", metavar="DIR")
  resume: bool = option(False, "continue the run in --out from its last checkpoint", group="run")
  checkpoint_every: int = option(5, "epochs between checkpoints", group="run")
  devices: str = option("1", "'all' or a number of local devices", group="run", metavar="N")
  mesh: str | None = option(
      None, "a device mesh AXIS=SIZE,...: data (rows), fsdp (rows and sharded parameters), model "
      "(tensor parallel), e.g. data=2,fsdp=4; replaces --devices", group="run", metavar="AXES",
      default_text="data=--devices")
  distributed: bool = option(False, "call jax.distributed.initialize() first (multi-host)", group="run")
  progress: bool | None = option(None, "progress bars", group="run", default_text="on when stderr is a terminal")
  tensorboard: str | None = option(
      None, "write TensorBoard event files here (one run per method under --compare)", group="run",
      default_text="none", metavar="DIR")

  def replace(self, **changes: Any) -> "TrainConfig":
    return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict[str, Any]] = {
    # DiveBatch paper, CIFAR-10 (ResNet-18, 200 epochs, cosine T_max 200).
    "paper-cifar10": dict(
        dataset="cifar10", model="resnet18", method="divebatch", epochs=200, batch_size=128,
        max_batch_size=2048, lr=0.1, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
        schedule="cosine", delta=0.1, resize_every=20, growth_every=20, lr_rule="none",
    ),
    # CIFAR-100: MultiStep [60, 120, 160] x0.2, δ = 0.01.
    "paper-cifar100": dict(
        dataset="tfds:cifar100", model="resnet18", method="divebatch", epochs=200, batch_size=128,
        max_batch_size=2048, lr=0.1, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
        schedule="multistep", schedule_milestones=(60, 120, 160), schedule_gamma=0.2,
        delta=0.01, resize_every=20, growth_every=20, lr_rule="none",
    ),
    # Tiny-ImageNet: StepLR(30, 0.1), 90 epochs, b0 = 256, lr 0.01, wd 1e-4, accumulate past 512.
    "paper-tinyimagenet": dict(
        dataset="tfds:tiny_imagenet", model="resnet18", method="divebatch", epochs=90,
        batch_size=256, max_batch_size=2048, lr=0.01, optimizer="sgd", momentum=0.9,
        weight_decay=1e-4, schedule="step", schedule_milestones=(30,), schedule_gamma=0.1,
        delta=0.01, resize_every=20, growth_every=20, max_device_batch=512, lr_rule="none",
    ),
    # CPU-sized character GPT on tinyshakespeare (0.11M parameters, context 64, 15,685
    # training windows = 1M tokens per epoch): AdamW, warmup + cosine over the run's tokens.
    "cpu-shakespeare": dict(
        dataset="tinyshakespeare", model="gpt", method="divebatch", epochs=2, batch_size=16,
        max_batch_size=256, lr=3e-3, optimizer="adamw", weight_decay=0.1, schedule="cosine-examples",
        warmup_steps=50, clip_norm=1.0, resize_every_steps=100, test_every=20,
        num_test_examples=512, eval_batch_size=512, lr_rule="none",
    ),
    # GPU preset: the ≈10.8M-parameter char GPT (6 layers, width 384, context 256).
    "gpu-shakespeare": dict(
        dataset="tinyshakespeare", model="gpt-10m", method="divebatch", epochs=5, batch_size=32,
        max_batch_size=512, lr=1e-3, optimizer="adamw", weight_decay=0.1, schedule="cosine-examples",
        warmup_steps=100, clip_norm=1.0, resize_every_steps=200, test_every=50, lr_rule="none",
    ),
    # CPU-sized CIFAR-10: small CNN on a 10,000-image subset.
    "cpu-cifar10": dict(
        dataset="cifar10", model="cnn", method="divebatch", epochs=20, batch_size=32,
        max_batch_size=1024, lr=0.05, num_examples=10_000, num_test_examples=2_000,
        delta=0.01, resize_every=4, growth_every=4, schedule="cosine",
    ),
}


def from_preset(name: str) -> TrainConfig:
  if name not in PRESETS:
    raise ConfigError(f"--preset must be one of {sorted(PRESETS)}, got {name!r}.")
  return TrainConfig(**PRESETS[name])


def ramp_steps(config: TrainConfig) -> int:
  """The lr ramp a run uses: --lr-ramp-steps, else RAMP_UNDER_LR_RULE under an lr rule."""
  if config.lr_ramp_steps is not None:
    return config.lr_ramp_steps
  return 0 if config.lr_rule == "none" else RAMP_UNDER_LR_RULE


def default_model(dataset: str) -> str:
  """The model a data set trains by default (:data:`DEFAULT_MODELS`)."""
  key = dataset if dataset in DEFAULT_MODELS else dataset.split(":", 1)[0] + ":*"
  return DEFAULT_MODELS.get(key, "mlp")


def with_defaults(config: TrainConfig) -> TrainConfig:
  """``config`` with the per-data-set defaults filled in: ``model`` from the data set,
  ``lr`` from the model, and for text data decisions every :data:`TEXT_DECISION_STEPS`
  steps (fields set explicitly are kept)::

      >>> config = with_defaults(TrainConfig(dataset="cifar10"))
      >>> config.model, config.lr
      ('cnn', 0.01)
      >>> config = with_defaults(TrainConfig(dataset="cifar10", model="mlp", lr=0.5))
      >>> config.model, config.lr
      ('mlp', 0.5)
  """
  model = config.model if config.model is not None else default_model(config.dataset)
  lr = config.lr if config.lr is not None else DEFAULT_LR.get(model, FALLBACK_LR)
  every_steps = config.resize_every_steps
  if every_steps is None and (config.dataset == "tinyshakespeare" or config.dataset.startswith("text:")):
    every_steps = TEXT_DECISION_STEPS
  return config.replace(model=model, lr=lr, resize_every_steps=every_steps)


# The flag that sets each epoch-cadenced method's period (for the note below).
_CADENCE_FLAGS = {"divebatch": "resize_every", "adabatch": "growth_every", "sebs": "growth_every"}


def cadence_note(config: TrainConfig, needs_stats) -> str | None:
  """A line to print when the method's cadence is longer than the run, else None.

  ``needs_stats`` is the policy's measurement window (``policy.needs_stats``): a
  statistics-driven rule that measures in none of the run's epochs (before its last,
  for a rule deciding at epoch ends) never changes the batch size; nor does a schedule whose period (``--growth-every``) is not shorter
  than the run::

      >>> print(cadence_note(TrainConfig(method="divebatch", epochs=5), lambda e: e == 4))
      note: --method divebatch measures first in epoch 5 and decides at its end, so this 5-epoch run's
      batch size stays 16; pass --resize-every 4 or more --epochs.
      >>> print(cadence_note(TrainConfig(method="divebatch", epochs=6), lambda e: e == 4))
      None
  """
  c = config
  flag = _CADENCE_FLAGS.get(c.method)
  hint = f"; pass {flag_name(flag)} {max(c.epochs - 1, 1)} or more --epochs" if flag else ""
  if methods.METHODS[c.method].needs_stats:
    # a rule deciding at epoch ends acts only on what it measured before the last epoch
    acting = range(c.epochs - 1 if flag and c.resize_every_steps is None else c.epochs)
    if any(needs_stats(e) for e in acting):
      return None
    first = next((e for e in range(len(acting), 100 * c.epochs + 1000) if needs_stats(e)), None)
    when = f"measures first in epoch {first + 1} and decides at its end" if first is not None else "never measures"
    return (f"note: --method {c.method} {when}, so this {c.epochs}-epoch run's batch size stays "
            f"{c.batch_size}{hint}.")
  if flag and c.resize_every_steps is None and getattr(c, flag) >= c.epochs:
    return (f"note: --method {c.method} first changes the batch size after epoch {getattr(c, flag)} "
            f"({flag_name(flag)} {getattr(c, flag)}), so this {c.epochs}-epoch run keeps "
            f"{c.batch_size}{hint}.")
  return None


def _need(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def field_problem(name: str, value: Any) -> str | None:
  """Why ``value`` cannot be the :class:`TrainConfig` field ``name`` by its type (None: it can).

  The one type rule of the settings, for flags given in code and for a stored
  ``config.json`` alike: ``int`` fields take integers (not bools), ``float`` fields
  numbers, ``str`` fields strings, ``bool`` fields booleans, ``X | None`` also None
  (null) and ``tuple[int, ...]`` a list of integers::

      >>> print(field_problem("lr", 0.05))
      None
      >>> field_problem("lr", "0.05")
      "must be a number or null, got '0.05'"
      >>> field_problem("schedule_milestones", 5)
      'must be a list of integers, got 5'
  """
  annotation = typing.get_type_hints(TrainConfig)[name]
  args = typing.get_args(annotation)
  if typing.get_origin(annotation) is tuple:
    ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return None if ok else f"must be a list of integers, got {value!r}"
  nullable = type(None) in args
  kind = next((a for a in args if a is not type(None)), annotation)
  if value is None:
    return None if nullable else f"must be {_TYPE_NAMES[kind]}, got null"
  accepted = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}[kind]
  if isinstance(value, accepted) and (kind is bool or not isinstance(value, bool)):
    return None
  return f"must be {_TYPE_NAMES[kind]}{' or null' if nullable else ''}, got {value!r}"


def _check_types(config: TrainConfig) -> None:
  """Every field of its type (:func:`field_problem`), and every number finite."""
  for field in dataclasses.fields(TrainConfig):
    value = getattr(config, field.name)
    problem = field_problem(field.name, value)
    _need(problem is None, f"{flag_name(field.name)} {problem}.")
    _need(not isinstance(value, float) or math.isfinite(value),
          f"{flag_name(field.name)} must be a finite number, got {value!r}.")


def validate(config: TrainConfig) -> TrainConfig:
  """Checks every field; raises :class:`ConfigError` naming the flag on the first bad one.

  Returns the config with its per-data-set defaults filled in (:func:`with_defaults`).
  """
  _check_types(config)
  c = config = with_defaults(config)
  _need(
      c.dataset in DATASETS or any(c.dataset.startswith(p) and len(c.dataset) > len(p) for p in DATASET_PREFIXES),
      f"--dataset must be one of {DATASETS}, tfds:NAME, npz:PATH or text:PATH, got {c.dataset!r}.",
  )
  _need(c.model in MODELS, f"--model must be one of {MODELS}, got {c.model!r}.")
  _need(c.norm is None or c.norm in NORMS, f"--norm must be one of {NORMS}, got {c.norm!r}.")
  _need(c.method in methods.NAMES, f"--method must be one of {methods.NAMES}, got {c.method!r}.")
  _need(c.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}, got {c.optimizer!r}.")
  _need(c.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}, got {c.schedule!r}.")
  _need(c.stats_method in STATS_METHODS, f"--stats-method must be one of {STATS_METHODS}, got {c.stats_method!r}.")
  _need(c.lr_rule in LR_RULES, f"--lr-rule must be one of {LR_RULES}, got {c.lr_rule!r}.")
  _need(c.estimator in ESTIMATORS, f"--estimator must be one of {ESTIMATORS}, got {c.estimator!r}.")
  _need(c.lr_batch_coupling in (None, *LR_BATCH_COUPLINGS), f"--lr-batch-coupling must be one of {LR_BATCH_COUPLINGS}, got {c.lr_batch_coupling!r}.")
  _need(
      methods.lr_batch_coupling(c) == "none" or c.lr_rule == "none",
      f"--lr-batch-coupling replace sets the lr from the batch growth: use --lr-rule none, got {c.lr_rule!r}.",
  )
  _need(
      methods.lr_batch_coupling(c) == "none" or c.schedule != "cosine-examples",
      "--lr-batch-coupling replace (and seesaw) follow a per-epoch --schedule (cosine, multistep, step), "
      "got cosine-examples.",
  )
  for flag, value in [
      ("--epochs", c.epochs), ("--batch-size", c.batch_size), ("--max-batch-size", c.max_batch_size),
      ("--resize-every", c.resize_every), ("--growth-every", c.growth_every),
      ("--test-every", c.test_every), ("--checkpoint-every", c.checkpoint_every),
      ("--eval-batch-size", c.eval_batch_size),
  ]:
    _need(isinstance(value, int) and value >= 1, f"{flag} must be an integer >= 1, got {value!r}.")
  _need(
      c.batch_size <= c.max_batch_size,
      f"--batch-size ({c.batch_size}) must be <= --max-batch-size ({c.max_batch_size}).",
  )
  for flag, value in [("--num-examples", c.num_examples), ("--num-test-examples", c.num_test_examples), ("--max-device-batch", c.max_device_batch), ("--device-batch", c.device_batch), ("--first-resize", c.first_resize), ("--resize-every-steps", c.resize_every_steps), ("--context", c.context), ("--ramp-examples", c.ramp_examples), ("--ramp-increment", c.ramp_increment)]:
    _need(value is None or (isinstance(value, int) and value >= 1), f"{flag} must be an integer >= 1, got {value!r}.")
  _need(
      c.num_examples is None or c.batch_size <= c.num_examples,
      f"--batch-size ({c.batch_size}) must be <= --num-examples ({c.num_examples}): a batch "
      "cannot hold more than every training example once.",
  )
  milestones = c.schedule_milestones
  _need(
      all(isinstance(m, int) and m >= 1 for m in milestones) and list(milestones) == sorted(set(milestones)),
      f"--schedule-milestones must be strictly increasing integers >= 1 (epochs), got {list(milestones)}.",
  )
  _need(0 < c.schedule_gamma <= 1, f"--schedule-gamma must be in (0, 1], got {c.schedule_gamma!r}.")
  _need(c.delta is None or c.delta > 0, f"--delta must be > 0, got {c.delta!r}.")
  for flag, value in [("--lr", c.lr), ("--growth-factor", c.growth_factor), ("--lr-factor", c.lr_factor), ("--eta", c.eta), ("--theta", c.theta), ("--noise-target-scale", c.noise_target_scale)]:
    _need(value > 0, f"{flag} must be > 0, got {value!r}.")
  _need(c.lr_ramp_steps is None or isinstance(c.lr_ramp_steps, int) and c.lr_ramp_steps >= 0, f"--lr-ramp-steps must be an integer >= 0, got {c.lr_ramp_steps!r}.")
  _need(c.growth_factor >= 1, f"--growth-factor must be >= 1, got {c.growth_factor!r}.")
  _need(0 <= c.momentum < 1, f"--momentum must be in [0, 1), got {c.momentum!r}.")
  _need(c.weight_decay >= 0, f"--weight-decay must be >= 0, got {c.weight_decay!r}.")
  _need(c.nu is None or c.nu > 0, f"--nu must be > 0, got {c.nu!r}.")
  _need(isinstance(c.warmup_steps, int) and c.warmup_steps >= 0, f"--warmup-steps must be an integer >= 0, got {c.warmup_steps!r}.")
  _need(c.clip_norm is None or c.clip_norm > 0, f"--clip-norm must be > 0, got {c.clip_norm!r}.")
  _need(c.max_lr_scale is None or c.max_lr_scale > 0, f"--max-lr-scale must be > 0, got {c.max_lr_scale!r}.")
  _need(0 <= c.seed < SEED_LIMIT, f"--seed must be an integer in [0, 2**63), got {c.seed!r}.")
  _need(c.out != "", "--out must name a folder, got '' (the run would write into the current folder).")
  for flag, path in (("--out", c.out), ("--data-dir", c.data_dir), ("--compilation-cache", c.compilation_cache)):
    problem = _path_problem(flag, path)
    _need(problem is None, problem)
  _need(
      c.devices == "all" or (c.devices.isdigit() and int(c.devices) >= 1),
      f"--devices must be 'all' or an integer >= 1, got {c.devices!r}.",
  )
  return c


def validate_against_data(config: TrainConfig, num_examples: int) -> tuple[TrainConfig, list[str]]:
  """Checks the batch sizes against the loaded training set of ``num_examples`` rows.

  Call it once the data set is loaded (n is known only then). The rules:

  * ``--batch-size`` b0 > n is an error (ConfigError naming the flag and n): a
    step cannot hold more than every example once, and the run would not be the
    one asked for.
  * ``--max-batch-size`` > n is clamped to n, and so is ``--max-device-batch``:
    they are ceilings, and no step can use more than n rows. Each clamp is
    returned as a note to print.

  n is the global training-set size for any number of processes: every process
  samples from all n examples and gathers its own rows of each global batch.

  Returns the (possibly clamped) config and the notes::

      >>> config, notes = validate_against_data(TrainConfig(batch_size=16, max_batch_size=512), 300)
      >>> config.max_batch_size, notes
      (300, ['--max-batch-size 512 is larger than the training set (n = 300 examples); using 300.'])
      >>> validate_against_data(TrainConfig(batch_size=400), 300)
      Traceback (most recent call last):
      ...
      divebatch_jax.train.config.ConfigError: --batch-size (400) must be <= the training set size
      (n = 300 examples): a batch cannot hold more than every example once.
  """
  n = num_examples
  _need(
      config.batch_size <= n,
      f"--batch-size ({config.batch_size}) must be <= the training set size (n = {n} examples): "
      "a batch cannot hold more than every example once.",
  )
  changes, notes = {}, []
  for name, value in (("max_batch_size", config.max_batch_size), ("max_device_batch", config.max_device_batch)):
    if value is not None and value > n:
      changes[name] = n
      notes.append(
          f"{flag_name(name)} {value} is larger than the training set (n = {n} examples); "
          f"using {n}."
      )
  return config.replace(**changes), notes
