"""swiftkv-jax: SwiftKV Llama inference and distillation in JAX/Flax.

The public names are imported on first use (PEP 562), so `import swiftkv_jax` and the command
line's start (which re-executes itself once, hugepages.py) do not pay for JAX until it is needed.
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING

# public name -> the submodule that defines it
_EXPORTS = {
    "KVCache": "cache", "init_cache": "cache",
    "ConfigError": "config", "ModelConfig": "config",
    "GenerateError": "request", "generate": "generation",
    "forward": "model", "init_params": "model",
    "Params": "params",
    "swiftkv_off": "swiftkv", "to_swiftkv": "swiftkv",
    "Engine": "engine",
    "FinishReason": "handle", "RequestHandle": "handle",
    "default_model_path": "loading", "load": "loading",
    "SamplingOptions": "request",
    "WeightsError": "weights", "load_checkpoint": "weights", "save_checkpoint": "weights",
    "save_hf_folder": "weights",
}
__all__ = sorted(_EXPORTS)

if _TYPE_CHECKING:
    from .cache import KVCache, init_cache
    from .config import ConfigError, ModelConfig
    from .engine import Engine
    from .generation import generate
    from .handle import FinishReason, RequestHandle
    from .loading import default_model_path, load
    from .model import forward, init_params
    from .params import Params
    from .request import GenerateError, SamplingOptions
    from .swiftkv import swiftkv_off, to_swiftkv
    from .weights import WeightsError, load_checkpoint, save_checkpoint, save_hf_folder


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'swiftkv_jax' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
