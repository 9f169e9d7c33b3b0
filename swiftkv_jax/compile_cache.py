"""Where swiftkv-jax keeps what it computes once per user (`user_cache_dir`), and JAX's persistent
compilation cache there, on for the command line, benchmarks and notebooks."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(env: str, name: str) -> Path:
    """$env when set (and not empty), else ~/.cache/swiftkv-jax/<name>."""
    return Path(os.environ.get(env) or Path.home() / ".cache" / "swiftkv-jax" / name)


def enable_compilation_cache(min_compile_time_s: float = 0.0) -> Path:
    """Compiled programs persist between runs (in $SWIFTKV_JAX_CACHE, default
    ~/.cache/swiftkv-jax/xla), so only the first run of a shape pays compilation. Returns the folder."""
    import jax
    cache = user_cache_dir("SWIFTKV_JAX_CACHE", "xla")
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    return cache
