"""``divebatch_jax.policies``: the import path of the batch-size policies (pinned public API).

The policies live in :mod:`divebatch_jax.transform.policies`, beside the
transformation that runs them; this module keeps ``import divebatch_jax.policies``
and ``from divebatch_jax.policies import divebatch`` working.
"""

from divebatch_jax.transform.policies import *  # noqa: F401,F403  (re-export)
from divebatch_jax.transform.policies import __all__  # noqa: F401
