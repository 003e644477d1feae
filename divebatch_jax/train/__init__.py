"""The training shell (``divebatch-train``, :func:`main`): models, checkpoints, metrics and plots for ``divebatch-train``.

It needs the ``train`` extra (``pip install 'divebatch_jax[train]'``: TFDS, orbax,
scikit-learn, matplotlib, tqdm, tensorboardX); importing it without them raises one
line naming what is missing.

* :mod:`divebatch_jax.train.models` -- flax nnx models and the pure
  ``loss_fn(params, batch) -> (B,)`` bridge to the statistics kernel;
* :mod:`divebatch_jax.train.checkpoints` -- atomic orbax checkpoints;
* :mod:`divebatch_jax.train.metrics` -- ``metrics.jsonl`` (one object per epoch)
  and ``summary.json``;
* :mod:`divebatch_jax.train.plots` -- batch size, lr, diversity and accuracy
  against epochs, optimizer steps and wall time (PNG).
"""

import sys

from divebatch_jax._optional import INSTALL_HINT, missing_shell_packages

_MISSING = missing_shell_packages()

if _MISSING:  # the shell's packages are the `train` extra: one line, never a traceback from deep inside

  def _missing_message() -> str:
    verb = "is" if len(_MISSING) == 1 else "are"
    return f"divebatch-train needs {', '.join(_MISSING)}, which {verb} not installed: {INSTALL_HINT}"

  def main(argv=None):  # pylint: disable=unused-argument
    raise ModuleNotFoundError(_missing_message(), name=_MISSING[0])

  def console_main() -> None:
    print(_missing_message(), file=sys.stderr)
    sys.exit(2)

else:
  from divebatch_jax.train.cli import console_main, main  # pylint: disable=g-import-not-at-top

__all__ = ["console_main", "main"]
