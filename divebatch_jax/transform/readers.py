"""Host-side readers of :func:`~divebatch_jax.adaptive_batch`'s state: the batch size to
use next, a log summary, injected hyperparameters, and the checks that make a wrong
composition say so (a measurement window without statistics, ``optax.MultiSteps``
around the transformation, steps skipped by ``optax.apply_if_finite``)."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax

from divebatch_jax.transform.adaptive import AdaptiveBatchState

_warned: set[str] = set()  # the warnings already given in this process (each once)


def find_state(opt_state: Any) -> AdaptiveBatchState:
  """The (first) :class:`AdaptiveBatchState` inside a possibly nested optimizer state.

  Works through ``optax.chain``, ``optax.inject_hyperparams`` and flax
  ``nnx.Optimizer.opt_state`` (``optax.tree_utils.tree_get_all_with_path`` by name).
  """
  found = optax.tree_utils.tree_get_all_with_path(opt_state, AdaptiveBatchState.__name__)
  if not found:
    raise ValueError("no AdaptiveBatchState found: was the optimizer built with adaptive_batch?")
  return found[0][1]


def _host_scalar(field: Any):
  leaves = jax.tree.leaves(field)
  return jax.device_get(leaves[0]).item()


def _wrappers(opt_state: Any, name: str) -> list:
  """The optax wrapper states called ``name`` that hold an :class:`AdaptiveBatchState`."""
  found = optax.tree_utils.tree_get_all_with_path(opt_state, name)
  return [value for _, value in found
          if optax.tree_utils.tree_get_all_with_path(value, AdaptiveBatchState.__name__)]


def _check_composition(opt_state: Any) -> None:
  """One clear error for ``optax.MultiSteps`` around the transformation."""
  if _wrappers(opt_state, "MultiStepsState"):
    raise ValueError(
        "adaptive_batch inside optax.MultiSteps: MultiSteps calls update() once per k "
        "micro-steps with the last micro-step's stats=/count= only, so examples and epochs "
        "are miscounted. Put MultiSteps inside instead — adaptive_batch(optax.MultiSteps(inner, k), "
        "policy, ...) — and pass every micro-step's stats= (or combine the k records with "
        "divebatch_jax.combine_stats and pass them to one update)."
    )


def _warn_once(key: str, message: str) -> None:
  if key not in _warned:
    _warned.add(key)
    warnings.warn(message, stacklevel=3)


def _warn_unmeasured(windows: int) -> None:
  if windows > 0:
    _warn_once("no-stats", (
        f"adaptive_batch: {windows} measurement window(s) of a statistics-reading policy ended "
        "without statistics, so the policy could not resize: pass stats= (from "
        "divebatch_jax.gradient_stats or divebatch_jax.nnx.value_and_grad) to tx.update / "
        "nnx.Optimizer.update(model, grads, stats=stats) on the steps of its window "
        "(policy.needs_stats(epoch))."))


def _skipped_hint(opt_state: Any) -> str:
  """A hint to put ``optax.apply_if_finite`` inside when, around us, it skipped updates."""
  skipped = sum(int(jax.device_get(s.total_notfinite)) for s in _wrappers(opt_state, "ApplyIfFiniteState"))
  if not skipped:
    return ""
  return (f" optax.apply_if_finite around adaptive_batch skipped {skipped} non-finite update(s), whose "
          "examples were never counted: put it inside instead, adaptive_batch(optax.apply_if_finite(inner, k), "
          "policy, ...), which counts a skipped step's examples.")


def current_batch_size(opt_state: Any, *, epoch: int | None = None) -> int:
  """The batch size to use next, as a Python int (one device-to-host read).

  With ``epoch`` (the caller's 0-based epoch, read at its start) it also checks
  that the transformation counts the same epoch and is at its start: a loop that
  drops an epoch's last partial batch (see ``drop_remainder``), or steps that pass
  neither ``stats`` nor ``count``, make the two drift apart, which is reported here in
  one line. It warns once when a statistics-reading policy's window ended without
  statistics, and raises for ``optax.MultiSteps`` around the transformation.
  """
  _check_composition(opt_state)
  state = find_state(opt_state)
  size, counted, position, unmeasured = (int(v) for v in jax.device_get([
      jax.tree.leaves(getattr(state, f))[0]
      for f in ("batch_size", "epoch", "epoch_position", "unmeasured_windows")]))
  _warn_unmeasured(unmeasured)
  if epoch is not None and (counted != epoch or position != 0):
    raise ValueError(
        f"epoch drift: the loop starts epoch {epoch} but adaptive_batch counts epoch {counted} "
        f"at example {position}: every example of an epoch must reach update() once; pass "
        "stats= (or count= the step's real rows) on every step and do not drop the last "
        "partial batch (data.Pipeline serves it; or build the transformation with "
        "drop_remainder=True)." + _skipped_hint(opt_state)
    )
  return size


def _is_injected(path, value) -> bool:
  """``optax.tree_utils`` filter: a value held in an ``inject_hyperparams`` state's ``hyperparams``."""
  del value
  return len(path) >= 2 and getattr(path[-2], "name", None) == "hyperparams"


def _injected(tree: Any, name: str) -> list:
  """The values of injected hyperparameter ``name`` in ``tree`` (``optax.inject_hyperparams``)."""
  return [value for _, value in optax.tree_utils.tree_get_all_with_path(tree, name, _is_injected)]


def _injected_learning_rate(inner_state: Any) -> float | None:
  """The learning rate of an ``optax.inject_hyperparams`` state inside ``inner_state``."""
  found = _injected(inner_state, "learning_rate")
  return float(jax.device_get(jax.tree.leaves(found[0])[0])) if found else None


def set_hyperparameter(opt_state: Any, name: str, value: float) -> Any:
  """A copy of ``opt_state`` with every injected hyperparameter ``name`` set to ``value``
  in its own dtype (``optax.inject_hyperparams``; ``optax.tree_utils.tree_set``): a rate
  set from a Python float this way does not change the step's signature, so the step
  does not recompile (a plain ``state.hyperparams[name] = 0.1`` is weakly typed and does).

  Example::

      >>> import optax, jax.numpy as jnp
      >>> import divebatch_jax as dbj
      >>> tx = dbj.adaptive_batch(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
      ...                         dbj.policies.adabatch(factor=2, every=20, max_batch_size=64),
      ...                         num_examples=100, base_batch_size=8)
      >>> opt_state = dbj.set_hyperparameter(tx.init(jnp.zeros(3)), "learning_rate", 0.5 * 0.1)
      >>> rate = dbj.find_state(opt_state).inner_state.hyperparams["learning_rate"]
      >>> rate.dtype, round(float(rate), 6)
      (dtype('float32'), 0.05)
  """
  found = _injected(opt_state, name)
  if not found:
    raise ValueError(
        f"no optax.inject_hyperparams state with hyperparameter {name!r} in the optimizer state."
    )
  dtype = jnp.result_type(jax.tree.leaves(found[0])[0])
  return optax.tree_utils.tree_set(opt_state, _is_injected, **{name: jnp.asarray(value, dtype)})


def batch_state_summary(opt_state: Any) -> dict[str, float | int | None]:
  """Host copy of the fields a log needs: batch size, lr scale, statistic, counters.

  ``learning_rate`` is the effective rate of the next step — the injected rate of
  an ``optax.inject_hyperparams`` inner optimizer times ``lr_scale`` — or None
  when the inner optimizer's rate is not injected (then the rate is yours ×
  ``lr_scale``).
  """
  state = find_state(opt_state)
  fields = (
      "batch_size", "lr_scale", "statistic", "steps", "epoch", "examples_seen", "progress",
      "requested", "decisions", "unmeasured_windows",
  )
  values = jax.device_get([jax.tree.leaves(getattr(state, f))[0] for f in fields])
  summary = {("step" if f == "steps" else f): v.item() for f, v in zip(fields, values)}
  _warn_unmeasured(summary["unmeasured_windows"])
  base_lr = _injected_learning_rate(state.inner_state)
  summary["learning_rate"] = None if base_lr is None else base_lr * summary["lr_scale"]
  return summary
