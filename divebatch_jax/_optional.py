"""The training shell's packages: an optional extra, imported on first use.

``pip install divebatch_jax`` brings what the library itself imports (jax, optax,
chex, numpy, flax). The shell (``divebatch-train``, TFDS and digits sources,
checkpoints, plots, TensorBoard, progress bars) needs more, the ``train`` extra:
``pip install 'divebatch_jax[train]'``. Each of those imports goes through
:func:`require`, so a missing package is one line naming what needed it and how to
install it, never a traceback deep in the shell.

    >>> from divebatch_jax import _optional
    >>> _optional.require("json", needed_by="this example").__name__
    'json'
    >>> _optional.require("no_such_package_xyz", needed_by="this example")
    Traceback (most recent call last):
    ...
    ModuleNotFoundError: this example needs 'no_such_package_xyz', which is not installed: pip install 'divebatch_jax[train]'
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# Import name -> the distribution that provides it (as pip names it).
SHELL_PACKAGES = {
    "tensorflow_datasets": "tensorflow-datasets",
    "orbax.checkpoint": "orbax-checkpoint",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "tensorboardX": "tensorboardX",
}
INSTALL_HINT = "pip install 'divebatch_jax[train]'"


def require(module: str, *, needed_by: str) -> ModuleType:
  """Imports ``module``, or raises one-line ModuleNotFoundError naming ``needed_by`` and the extra."""
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as error:
    if error.name is None or not module.startswith(error.name):
      raise  # a package that is there failed to import one of its own dependencies
    distribution = next(
        (dist for name, dist in SHELL_PACKAGES.items() if module == name or module.startswith(name + ".")),
        module.split(".")[0],
    )
    raise ModuleNotFoundError(
        f"{needed_by} needs {distribution!r}, which is not installed: {INSTALL_HINT}", name=error.name
    ) from None


def missing_shell_packages() -> list[str]:
  """The distributions of the ``train`` extra that cannot be imported here, in a fixed order."""
  return [dist for module, dist in SHELL_PACKAGES.items() if not _importable(module.split(".")[0])]


def _importable(top_level: str) -> bool:
  try:
    return importlib.util.find_spec(top_level) is not None
  except (ImportError, ValueError):  # a finder that refuses it, or a half-removed package
    return False
