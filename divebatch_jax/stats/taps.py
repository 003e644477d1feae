"""Per-layer taps: per-example gradient norms without a per-example pass over the network.

The implementation is the package :mod:`divebatch_jax.stats.ghost` (its docstring explains the
method); this module keeps the name every caller imports.

    >>> from divebatch_jax.stats import taps
    >>> taps.trace_plan is taps.ghost.trace_plan
    True
"""

from divebatch_jax.stats import ghost
from divebatch_jax.stats.ghost import *  # noqa: F403  (the public names, ghost.__all__)
from divebatch_jax.stats.ghost.cost import _CHUNK_BYTES, _chunk_size  # noqa: F401  (tests, benchmarks)
from divebatch_jax.stats.ghost.forms import _product_tap  # noqa: F401
from divebatch_jax.stats.ghost.walker import _bind  # noqa: F401

__all__ = [*ghost.__all__, "ghost"]
