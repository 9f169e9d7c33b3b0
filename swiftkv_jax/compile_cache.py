"""Where swiftkv-jax keeps what it computes once per user (`user_cache_dir`), and JAX's persistent
compilation cache there, on for the command line, benchmarks and notebooks."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(env: str, name: str) -> Path:
    """$env when set (and not empty), else ~/.cache/swiftkv-jax/<name>."""
    return Path(os.environ.get(env) or Path.home() / ".cache" / "swiftkv-jax" / name)


def share_compilation_cache(folder: Path | str, min_compile_time_s: float = 0.0) -> None:
    """JAX's persistent compilation cache in `folder` (the CLI, notebooks, benchmarks and test
    workers share one). No size limit: with one, JAX would lock and evict, but it also warned on
    every write into a folder made without one (its LRU expects an access-time file per entry)."""
    import jax
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)


def enable_compilation_cache(min_compile_time_s: float = 0.0) -> Path:
    """Compiled programs persist between runs (in $SWIFTKV_JAX_CACHE, default
    ~/.cache/swiftkv-jax/xla), so only the first run of a shape pays compilation. Returns the folder."""
    cache = user_cache_dir("SWIFTKV_JAX_CACHE", "xla")
    share_compilation_cache(cache, min_compile_time_s)
    return cache
