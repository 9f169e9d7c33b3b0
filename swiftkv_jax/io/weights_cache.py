"""GGUF weights dequantised once per file and kept in our own layout (float32 safetensors).

Reading a GGUF means parsing its 49k vocabulary fields and dequantising every tensor: ~6 s for
SmolLM2-135M on a 2-core CPU, every run. The second load of the same file reads the arrays back
in a fraction of a second instead. Keyed by the file (path, size, mtime) and CACHE_VERSION; the
cache is a convenience: when it cannot be read or written, the GGUF is converted as before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..model.params import Params, empty_weights, get_path, set_path, tensors
from .weights import atomic_dir

CACHE_VERSION = 1  # bump when what load_gguf builds (layout, names, config fields) changes
WEIGHTS_FILE = "weights.safetensors"


def weights_cache_dir() -> Path | None:
    """$SWIFTKV_JAX_WEIGHTS_CACHE, default ~/.cache/swiftkv-jax/weights; None (no cache) when it
    is set to "off" or to nothing."""
    from ..compile_cache import user_cache_dir
    setting = os.environ.get("SWIFTKV_JAX_WEIGHTS_CACHE")
    if setting is not None and setting.strip().lower() in ("", "off", "0", "none"):
        return None
    return user_cache_dir("SWIFTKV_JAX_WEIGHTS_CACHE", "weights")


def cache_folder(path: Path) -> Path | None:
    """Where the converted weights of GGUF file `path` live (None: no cache); changes whenever
    the file does."""
    root = weights_cache_dir()
    if root is None:
        return None
    from .gguf import file_cache_key
    return root / file_cache_key(path, CACHE_VERSION)


def _key(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


def save_converted(params: Params, folder: Path) -> None:
    """Writes params as float32 safetensors keyed by tree path, plus config.json, atomically."""
    from safetensors.numpy import save_file
    arrays = {}
    for t in tensors(params.config):
        try:
            arrays[_key(t.path)] = np.ascontiguousarray(get_path(params.weights, t.path), np.float32)
        except (KeyError, IndexError):  # an optional tensor this model does not hold
            continue
    with atomic_dir(folder) as tmp:
        save_file(arrays, str(tmp / WEIGHTS_FILE))
        (tmp / "config.json").write_text(json.dumps(params.config.to_hf_dict(), indent=2))


def load_converted(folder: Path, dtype: Any) -> Params:
    """Params saved by save_converted, cast to `dtype`."""
    from safetensors import safe_open
    cfg = ModelConfig.from_json_file(folder / "config.json")
    weights = empty_weights(cfg)
    with safe_open(folder / WEIGHTS_FILE, "numpy") as f:
        stored = set(f.keys())
        for t in tensors(cfg):
            key = _key(t.path)
            if key in stored:
                set_path(weights, t.path, jnp.asarray(f.get_tensor(key), dtype))
            elif not t.optional:
                raise KeyError(f"{key} is missing from {folder}")
    return Params(weights, cfg)


def cached_gguf_params(path: Path, dtype: Any, progress: bool = True) -> Params:
    """load_gguf(path, dtype), converted once per file and read back from the cache afterwards."""
    from .gguf import load_gguf
    folder = cache_folder(path)
    if folder is None:
        return load_gguf(path, dtype, progress)
    if (folder / WEIGHTS_FILE).exists():
        try:
            return load_converted(folder, dtype)
        except Exception:  # a damaged or foreign cache entry: convert again and replace it
            pass
    params = load_gguf(path, jnp.float32, progress)
    try:
        save_converted(params, folder)
    except OSError:  # a read-only or full disk: convert every time
        pass
    return params if jnp.dtype(dtype) == jnp.float32 else params.astype(dtype)
