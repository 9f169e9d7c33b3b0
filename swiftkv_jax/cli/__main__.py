"""`python -m swiftkv_jax.cli ...`: the same as the `swiftkv-jax` console script."""

from . import entry

entry()
