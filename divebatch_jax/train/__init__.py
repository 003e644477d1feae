"""The training shell (``divebatch-train``, :func:`main`): models, checkpoints, metrics and plots for ``divebatch-train``.

* :mod:`divebatch_jax.train.models` -- flax nnx models and the pure
  ``loss_fn(params, batch) -> (B,)`` bridge to the statistics kernel;
* :mod:`divebatch_jax.train.checkpoints` -- atomic orbax checkpoints;
* :mod:`divebatch_jax.train.metrics` -- ``metrics.jsonl`` (one object per epoch)
  and ``summary.json``;
* :mod:`divebatch_jax.train.plots` -- batch size, lr, diversity and accuracy
  against epochs, optimizer steps and wall time (PNG).
"""

from divebatch_jax.train.cli import console_main, main

__all__ = ["console_main", "main"]
