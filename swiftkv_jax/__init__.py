"""swiftkv-jax: SwiftKV Llama inference and distillation in JAX/Flax."""

from .cache import KVCache, init_cache
from .config import ConfigError, ModelConfig
from .generate import GenerateError, generate
from .model import forward, init_params
from .params import Params
from .swiftkv import swiftkv_off, to_swiftkv

__all__ = [
    "ConfigError", "GenerateError", "KVCache", "ModelConfig", "Params", "forward", "generate",
    "init_cache", "init_params", "swiftkv_off", "to_swiftkv",
]

from .engine import Engine  # noqa: E402
from .handle import FinishReason, RequestHandle  # noqa: E402
from .loading import default_model_path, load  # noqa: E402
from .request import SamplingOptions  # noqa: E402
from .weights import WeightsError, load_checkpoint, save_checkpoint, save_hf_folder  # noqa: E402

__all__ += ["Engine", "FinishReason", "RequestHandle", "SamplingOptions", "WeightsError",
            "default_model_path", "load", "load_checkpoint", "save_checkpoint", "save_hf_folder"]
