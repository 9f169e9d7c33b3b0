"""swiftkv-jax: SwiftKV Llama inference and distillation in JAX/Flax.

The public names are imported on first use (PEP 562), so `import swiftkv_jax` and the command
line's start (which re-executes itself once, cli/hugepages.py) do not pay for JAX until it is needed.
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING

# public name -> the submodule that defines it
_EXPORTS = {
    "ConfigError": "config", "ModelConfig": "config",
    "Params": "model.params", "Llama": "model.modules",
    "forward": "model.forward", "init_params": "model.forward", "kernels_in_use": "model.attention",
    "swiftkv_off": "model.swiftkv", "to_swiftkv": "model.swiftkv",
    "KVCache": "runtime.cache", "init_cache": "runtime.cache",
    "generate": "runtime.generation",
    "Engine": "runtime.engine",
    "FinishReason": "runtime.request", "RequestHandle": "runtime.handle",
    "GenerateError": "runtime.request", "SamplingOptions": "runtime.request",
    "default_model_path": "io.loading", "load": "io.loading",
    "WeightsError": "io.weights", "load_checkpoint": "io.weights", "save_checkpoint": "io.weights",
    "save_hf_folder": "io.weights",
}
__all__ = sorted(_EXPORTS)

if _TYPE_CHECKING:
    from .config import ConfigError, ModelConfig
    from .io.loading import default_model_path, load
    from .io.weights import WeightsError, load_checkpoint, save_checkpoint, save_hf_folder
    from .model.attention import kernels_in_use
    from .model.forward import forward, init_params
    from .model.modules import Llama
    from .model.params import Params
    from .model.swiftkv import swiftkv_off, to_swiftkv
    from .runtime.cache import KVCache, init_cache
    from .runtime.engine import Engine
    from .runtime.generation import generate
    from .runtime.handle import RequestHandle
    from .runtime.request import FinishReason, GenerateError, SamplingOptions


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'swiftkv_jax' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
