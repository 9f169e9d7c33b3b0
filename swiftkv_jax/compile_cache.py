"""JAX's persistent compilation cache, on for the command line, benchmarks and notebooks."""

from __future__ import annotations

import os
from pathlib import Path


def enable_compilation_cache(min_compile_time_s: float = 0.0) -> Path:
    """Compiled programs persist between runs (in $SWIFTKV_JAX_CACHE, default
    ~/.cache/swiftkv-jax/xla), so only the first run of a shape pays compilation. Returns the folder."""
    import jax
    cache = Path(os.environ.get("SWIFTKV_JAX_CACHE", Path.home() / ".cache" / "swiftkv-jax" / "xla"))
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    return cache
