"""``python -m divebatch_jax.train``: the same as ``divebatch-train``."""

from divebatch_jax.train import console_main

console_main()
