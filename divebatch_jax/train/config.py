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
from typing import Any, Iterator

from divebatch_jax.stats import METHODS as STATS_METHODS
from divebatch_jax.transform.lr_rules import LR_RULES
from divebatch_jax.transform.policies.divebatch import ESTIMATORS
from divebatch_jax.train.models import MODEL_NAMES as MODELS
from divebatch_jax.train.models import NORMS
from divebatch_jax.train import methods

DATASETS = ("synthetic", "digits", "cifar10")  # plus "tfds:NAME" and "npz:PATH"
OPTIMIZERS = ("sgd", "adam", "adagrad")
RAMP_UNDER_LR_RULE = 50  # --lr-ramp-steps when unset and --lr-rule is not "none"
SCHEDULES = ("constant", "cosine", "multistep", "step")


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


# Longest file name and path the CLI accepts (Linux's NAME_MAX and PATH_MAX).
NAME_MAX, PATH_MAX = 255, 4096


def _path_problem(flag: str, path: str | None) -> str | None:
  """Why ``path`` cannot name a file (None: it can): too long as a whole or in one part."""
  if path is None:
    return None
  if len(path.encode()) >= PATH_MAX:
    return f"{flag} is {len(path.encode())} bytes long; paths must be shorter than {PATH_MAX}."
  longest = max(path.split("/"), key=lambda part: len(part.encode()))
  if len(longest.encode()) > NAME_MAX:
    return f"{flag}: the name {longest[:40]!r}... is {len(longest.encode())} bytes long; names must be at most {NAME_MAX}."
  return None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run. Field names match the CLI flags (``--max-batch-size`` ...)."""

  dataset: str = "digits"
  data_dir: str | None = None
  model: str = "mlp"
  norm: str | None = None  # None: the model's default ("group" for ResNets)
  method: str = "divebatch"
  epochs: int = 30
  batch_size: int = 16
  max_batch_size: int = 512
  lr: float = 0.05
  lr_rule: str = "none"
  max_lr_scale: float | None = None
  optimizer: str = "sgd"
  momentum: float = 0.9
  weight_decay: float = 5e-4
  schedule: str = "constant"
  schedule_milestones: tuple[int, ...] = ()
  schedule_gamma: float = 0.1
  # DiveBatch
  # Without --delta or --first-resize, DiveBatch sets δ at its first resize so that it asks
  # for 4·b0 (benchmarks/RESULTS.md: the paper's δ = 0.1 jumps to b_max and loses accuracy).
  delta: float | None = None
  resize_every: int = 5
  estimator: str = "epoch"
  first_resize: int | None = None  # instead of delta: the size the first resize asks for
  allow_decrease: bool = False
  # Steps over which the lr scale follows a batch-size change. None (see ramp_steps):
  # RAMP_UNDER_LR_RULE under an lr rule that rescales the step (linear, sqrt, adascale),
  # where 50 kept a ×5 resize from collapsing a run (benchmarks/RESULTS.md, protocol A);
  # 0 under --lr-rule none, so that AdaBatch's --lr-factor applies at once, as in its paper.
  lr_ramp_steps: int | None = None
  # AdaBatch / SEBS
  growth_factor: float = 2.0
  growth_every: int = 5
  lr_factor: float = 1.0
  # adaptive-sampling tests / noise scale
  eta: float = 0.5
  theta: float = 0.5
  nu: float | None = 1.0
  test_every: int = 10
  noise_target_scale: float = 1.0
  # data
  num_examples: int | None = None
  num_test_examples: int | None = None
  augment: bool | None = None  # None: on for CIFAR
  stats_method: str = "auto"
  max_device_batch: int | None = None  # upper bound of the device batch (default: max batch size)
  device_batch: int | None = None  # rows per call of the step; None: measured (fastest)
  round_batch: bool = True  # round policies' batch sizes to sizes laid out without padding
  compilation_cache: str | None = None  # JAX's persistent compilation cache; None: OUT/compilation_cache, "off": none
  eval_batch_size: int = 1000
  seed: int = 0
  # run
  out: str = "runs/default"
  resume: bool = False
  checkpoint_every: int = 5
  devices: str = "1"
  distributed: bool = False
  progress: bool | None = None  # None: on for a TTY

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


def _need(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def validate(config: TrainConfig) -> TrainConfig:
  """Checks every field; raises :class:`ConfigError` naming the flag on the first bad one."""
  c = config
  _need(
      c.dataset in DATASETS or (c.dataset.startswith(("tfds:", "npz:")) and len(c.dataset) > 4),
      f"--dataset must be one of {DATASETS}, tfds:NAME or npz:PATH, got {c.dataset!r}.",
  )
  _need(c.model in MODELS, f"--model must be one of {MODELS}, got {c.model!r}.")
  _need(c.norm is None or c.norm in NORMS, f"--norm must be one of {NORMS}, got {c.norm!r}.")
  _need(c.method in methods.NAMES, f"--method must be one of {methods.NAMES}, got {c.method!r}.")
  _need(c.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}, got {c.optimizer!r}.")
  _need(c.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}, got {c.schedule!r}.")
  _need(c.stats_method in STATS_METHODS, f"--stats-method must be one of {STATS_METHODS}, got {c.stats_method!r}.")
  _need(c.lr_rule in LR_RULES, f"--lr-rule must be one of {LR_RULES}, got {c.lr_rule!r}.")
  _need(c.estimator in ESTIMATORS, f"--estimator must be one of {ESTIMATORS}, got {c.estimator!r}.")
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
  for flag, value in [("--num-examples", c.num_examples), ("--num-test-examples", c.num_test_examples), ("--max-device-batch", c.max_device_batch), ("--device-batch", c.device_batch), ("--first-resize", c.first_resize)]:
    _need(value is None or (isinstance(value, int) and value >= 1), f"{flag} must be an integer >= 1, got {value!r}.")
  _need(
      c.num_examples is None or c.batch_size <= c.num_examples,
      f"--batch-size ({c.batch_size}) must be <= --num-examples ({c.num_examples}): a batch "
      "cannot hold more than every training example once.",
  )
  _need(c.delta is None or c.delta > 0, f"--delta must be > 0, got {c.delta!r}.")
  for flag, value in [("--lr", c.lr), ("--growth-factor", c.growth_factor), ("--lr-factor", c.lr_factor), ("--eta", c.eta), ("--theta", c.theta), ("--noise-target-scale", c.noise_target_scale)]:
    _need(value > 0, f"{flag} must be > 0, got {value!r}.")
  _need(c.lr_ramp_steps is None or isinstance(c.lr_ramp_steps, int) and c.lr_ramp_steps >= 0, f"--lr-ramp-steps must be an integer >= 0, got {c.lr_ramp_steps!r}.")
  _need(c.growth_factor >= 1, f"--growth-factor must be >= 1, got {c.growth_factor!r}.")
  _need(0 <= c.momentum < 1, f"--momentum must be in [0, 1), got {c.momentum!r}.")
  _need(c.weight_decay >= 0, f"--weight-decay must be >= 0, got {c.weight_decay!r}.")
  _need(c.nu is None or c.nu > 0, f"--nu must be > 0, got {c.nu!r}.")
  _need(c.max_lr_scale is None or c.max_lr_scale > 0, f"--max-lr-scale must be > 0, got {c.max_lr_scale!r}.")
  _need(c.seed >= 0, f"--seed must be >= 0, got {c.seed!r}.")
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

      config, notes = validate_against_data(TrainConfig(batch_size=16, max_batch_size=512), 300)
      config.max_batch_size, notes   # 300, ["--max-batch-size 512 is larger than ..."]
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
          f"--{name.replace('_', '-')} {value} is larger than the training set (n = {n} examples); "
          f"using {n}."
      )
  return config.replace(**changes), notes
