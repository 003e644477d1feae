"""The CLI's methods: one registry entry per ``--method``, read by every part of the shell.

An entry says how to build the method's batch-size policy from a
:class:`~divebatch_jax.train.config.TrainConfig`, whether the run must measure
throughputs for it (``needs_rates``) and what the statistic it logs is called
(None: it measures nothing, so no epoch is instrumented). The config's validation,
the CLI's ``--method`` / ``--compare`` choices, the loop (which rates to measure,
which statistic is the gradient diversity) and the plots read this table; adding
a method is adding one entry here.

Example::

    >>> from divebatch_jax.train import methods
    >>> from divebatch_jax.train.config import TrainConfig
    >>> methods.METHODS["norm-test"].statistic
    'requested batch size'
    >>> methods.build_policy(TrainConfig(method="adabatch")).name
    'adabatch'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, NamedTuple

from divebatch_jax import policies

if TYPE_CHECKING:  # config imports this module for the names
  from divebatch_jax.train.config import TrainConfig

DIVERSITY = "gradient diversity"  # DiveBatch's statistic Δ̂, logged as "diversity" and plotted


class Method(NamedTuple):
  """One ``--method``.

  Attributes:
    name: the CLI's name.
    make_policy: ``(config, rates) -> BatchSizePolicy``; ``rates`` are the measured
      examples/s per batch size (empty unless ``needs_rates``).
    statistic: what the policy's logged statistic is (None: it takes no statistics).
    needs_rates: the policy chooses among measured throughputs, which the run measures
      even with ``--device-batch`` given.
    lr_batch_coupling: the ``--lr-batch-coupling`` the method runs with unless the
      flag says otherwise (Seesaw is its batch schedule plus ``replace``).
  """

  name: str
  make_policy: Callable[["TrainConfig", Mapping[int, float]], policies.BatchSizePolicy]
  statistic: str | None = None
  needs_rates: bool = False
  lr_batch_coupling: str = "none"

  @property
  def needs_stats(self) -> bool:
    """Whether some of the method's steps are instrumented (per-example statistics)."""
    return self.statistic is not None


def _divebatch(c: "TrainConfig", rates) -> policies.BatchSizePolicy:
  del rates
  first_resize = c.first_resize
  if c.delta is None and first_resize is None:  # the default: a first resize to 4·b0
    first_resize = min(4 * c.batch_size, c.max_batch_size)
  return policies.divebatch(
      None if first_resize else c.delta, c.max_batch_size, resize_every=c.resize_every,
      estimator=c.estimator, allow_decrease=c.allow_decrease, first_resize=first_resize,
      min_batch_size=min(c.batch_size, c.max_batch_size), resize_every_steps=c.resize_every_steps,
  )


def _goodput(c: "TrainConfig", rates) -> policies.BatchSizePolicy:
  if not rates:
    raise ValueError("--method goodput needs measured throughputs (run without --device-batch once).")
  return policies.goodput(dict(rates), max_batch_size=c.max_batch_size, every=c.test_every)


def _linear_ramp(c: "TrainConfig", rates) -> policies.BatchSizePolicy:
  del rates
  ramp = dict(ramp_examples=c.ramp_examples) if c.ramp_examples else dict(ramp_epochs=max(c.epochs // 2, 1))
  return policies.linear_ramp(c.max_batch_size, increment=c.ramp_increment, **ramp)


def _seesaw(c: "TrainConfig", rates) -> policies.BatchSizePolicy:
  del rates
  if c.schedule == "cosine-examples":  # the halvings of the cosine over the run's examples
    return policies.seesaw_over_examples(
        c.epochs, c.batch_size, max_batch_size=c.max_batch_size, lr_power=_seesaw_power(c),
        every=c.resize_every_steps or 1)
  from divebatch_jax.train import optim  # pylint: disable=g-import-not-at-top  (optim imports config, which imports this module)

  return policies.seesaw(optim.epoch_schedule_decay(c), max_batch_size=c.max_batch_size, factor=c.growth_factor)


def _seesaw_power(c: "TrainConfig") -> float:
  """Seesaw's lr exponent: 1 under SGD, 1/2 under the adaptive optimizers."""
  return 1.0 if c.optimizer == "sgd" else 0.5


def _cbs_warmup(c: "TrainConfig", rates) -> policies.BatchSizePolicy:
  del rates
  from divebatch_jax.train import cbs  # pylint: disable=g-import-not-at-top  (cbs imports the loop)

  if c.cbs_file is None:
    raise ValueError("--method cbs-warmup needs --cbs-file FILE: the cbs.json that "
                     "`divebatch-train cbs --out RUN` writes from a run's checkpoints.")
  examples, values = cbs.read_curve(c.cbs_file)
  curve = policies.measured_cbs(examples, values) if c.cbs_fit == "measured" else policies.fitted_cbs(examples, values)
  return policies.cbs_warmup(curve, max_batch_size=c.max_batch_size, every=c.resize_every_steps or 1)


_ENTRIES = (
    Method("sgd", lambda c, rates: policies.constant()),
    Method("adabatch", lambda c, rates: policies.adabatch(
        c.growth_factor, c.growth_every, max_batch_size=c.max_batch_size, lr_factor=c.lr_factor,
        every_steps=c.resize_every_steps)),
    Method("sebs", lambda c, rates: policies.sebs(
        c.growth_factor, c.growth_every, c.max_batch_size, stage_steps=c.resize_every_steps)),
    Method("divebatch", _divebatch, statistic=DIVERSITY),
    Method("norm-test", lambda c, rates: policies.norm_test(c.eta, c.max_batch_size, every=c.test_every),
           statistic="requested batch size"),
    Method("inner-product", lambda c, rates: policies.inner_product_test(
        c.theta, c.nu, max_batch_size=c.max_batch_size, every=c.test_every),
           statistic="requested batch size"),
    Method("noise-scale", lambda c, rates: policies.noise_scale(
        c.noise_target_scale, max_batch_size=c.max_batch_size, every=c.test_every),
           statistic="simple noise scale B_simple"),
    Method("goodput", _goodput, statistic="simple noise scale B_simple", needs_rates=True),
    Method("linear-ramp", _linear_ramp),
    Method("seesaw", _seesaw, lr_batch_coupling="replace"),
    Method("cbs-warmup", _cbs_warmup),
)
METHODS: dict[str, Method] = {m.name: m for m in _ENTRIES}
NAMES: tuple[str, ...] = tuple(METHODS)


def method(name: str) -> Method:
  """The entry of ``name``; a ValueError naming ``--method`` and the choices otherwise."""
  if name not in METHODS:
    raise ValueError(f"--method must be one of {NAMES}, got {name!r}.")
  return METHODS[name]


def lr_batch_coupling(config: "TrainConfig") -> str:
  """``--lr-batch-coupling``, else the method's own (``replace`` for Seesaw; ``none`` for
  Seesaw on ``--schedule cosine-examples``, whose policy carries its (b/b₀)^p)."""
  if config.lr_batch_coupling:
    return config.lr_batch_coupling
  if config.method == "seesaw" and config.schedule == "cosine-examples":
    return "none"
  return method(config.method).lr_batch_coupling


def build_policy(config: "TrainConfig", rates: Mapping[int, float] | None = None) -> policies.BatchSizePolicy:
  """The batch-size policy that ``config.method`` names, with its flags.

  ``rates``: examples/s per batch size (the loop's device-batch measurement), which
  a method with ``needs_rates`` (goodput) chooses among.
  """
  return method(config.method).make_policy(config, rates or {})
