"""GGUF (llama.cpp) files: metadata -> ModelConfig, tensors dequantized -> HF names and layout.

llama.cpp stores a Llama's q/k weights permuted for interleaved RoPE; we undo that so the
half-split RoPE of the Hugging Face layout applies (as transformers' own GGUF loader does). Qwen2 and
Qwen3 files (architectures `qwen2`, `qwen3`) keep the Hugging Face order.

Loaded as int8 (`quantize="int8"`), a Q8_0 tensor (blocks of 32 int8 with one float16 scale, each
output's inputs contiguous) is our int8 layout at block 32: its values and scales are taken as they
are, never rounded through float32; tensors of other types are dequantised and quantised.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..model.int8 import Int8Weight
from ..model.params import HEADS, KV_HEADS, SCHEMA, Params, TensorKind, get_path, set_path
from .weights import WeightsError, params_from_tensors


@functools.lru_cache(maxsize=1)
def _gguf_kinds() -> tuple[dict[str, TensorKind], dict[str, TensorKind]]:
    """llama.cpp name -> schema kind, for model-level and per-layer ("blk.{i}.") names (built once)."""
    model = {k.gguf: k for k in SCHEMA if k.gguf and k.where == "model"}
    layer = {k.gguf.split(".", 2)[2]: k for k in SCHEMA if k.gguf and k.where != "model"}
    return model, layer


def _kind_of(gguf_name: str) -> tuple[TensorKind, int | None] | None:
    model, layer = _gguf_kinds()
    if gguf_name in model:
        return model[gguf_name], None
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in layer:
        return layer[parts[2]], int(parts[1])
    return None


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (None for tensors we do not use, e.g. rope_freqs)."""
    found = _kind_of(gguf_name)
    return None if found is None else found[0].hf.format(i=found[1])


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation ([out, in] rows interleaved per head)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_metadata(reader: Any) -> dict[str, Any]:
    """Scalar and string GGUF metadata fields (token lists are skipped)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in ("tokens", "scores",
                                                                         "token_type", "merges"):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # exotic field types we never need
            continue
    return meta


Q8_0_BLOCK = 32


def has_q8_0(path: str | Path) -> bool:
    """Whether the GGUF file holds Q8_0 tensors (an int8 load then takes them as they are)."""
    import gguf
    try:
        tensors = gguf.GGUFReader(str(path)).tensors
    except Exception:  # not readable: load_gguf says why
        return False
    return any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in tensors)


def load_gguf(path: str | Path, dtype: Any = jnp.float32, progress: bool = True,
              quantize: str | None = None) -> Params:
    """Params from a Llama / Qwen2 / Qwen3 GGUF file, dequantizing any tensor type the gguf
    package supports; with quantize="int8", int8 params whose Q8_0 tensors are the file's own."""
    import gguf
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises bare ValueError/struct errors
        raise WeightsError(f"{path} is not a readable GGUF file: {e}") from None
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise WeightsError(f"{path} has no token_embd.weight tensor; is it a llama GGUF?")
    vocab = int(tensors["token_embd.weight"].shape[1])
    cfg = ModelConfig.from_gguf_metadata(meta, vocab, tie_word_embeddings="output.weight" not in tensors)
    by_hf = {hf_name(n): t for n, t in tensors.items() if hf_name(n) is not None}
    heads = {HEADS: cfg.num_heads, KV_HEADS: cfg.num_kv_heads}

    direct = {} if quantize != "int8" else {
        name: t for name, t in by_hf.items()
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0 and _kind_of(t.name)[0].quant_in}

    def get(name: str) -> np.ndarray:
        t = by_hf[name]
        if name in direct:  # a placeholder, replaced below by the file's own int8 values
            return np.zeros(tuple(int(x) for x in reversed(t.shape)), np.float32)
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise WeightsError(f"GGUF tensor {t.name} has type {t.tensor_type.name}, which the gguf "
                               "package cannot dequantize; convert the model with another type") from None
        w = np.asarray(w, np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
        kind = _kind_of(t.name)[0]
        permuted = kind.rope_heads and cfg.family == "llama"
        return unpermute_qk(w, heads[kind.rope_heads]) if permuted else w

    params = params_from_tensors(cfg, get, by_hf.keys(), dtype, progress)
    if quantize is None:
        return params
    params = params.quantize(quantize, Q8_0_BLOCK if direct else None)
    for name, t in direct.items():
        kind, layer = _kind_of(t.name)
        rope_heads = heads[kind.rope_heads] if kind.rope_heads and cfg.family == "llama" else None
        placeholder = get_path(params.weights, kind.path(layer))
        values, scales = _q8_0_blocks(t, rope_heads)
        set_path(params.weights, kind.path(layer), Int8Weight(
            jnp.asarray(values.reshape(placeholder.values.shape)),
            jnp.asarray(scales.reshape(placeholder.scales.shape)), placeholder.in_dims))
    return params


def _q8_0_blocks(t: Any, rope_heads: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A Q8_0 tensor's int8 values [out, in] and float32 scales [out, in / 32]: each block of 32
    inputs of an output is 2 bytes of float16 scale, then 32 int8 values (q/k rows un-permuted
    like the float path's)."""
    n, k = int(t.shape[1]), int(t.shape[0])
    blocks = np.asarray(t.data).reshape(n, k // Q8_0_BLOCK, 2 + Q8_0_BLOCK)
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    values = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, k)
    if rope_heads:
        values, scales = unpermute_qk(values, rope_heads), unpermute_qk(scales, rope_heads)
    return values, scales


def tokenizer_from_gguf_metadata(path: str | Path) -> Any:
    """A transformers fast tokenizer built from the GGUF file's own vocabulary, merges, special
    tokens and chat template, without PyTorch (transformers' GGUF loader imports torch; the main
    job must run with jax alone). Uses transformers' GGUF tokenizer converters."""
    import gguf
    # Without torch, importing transformers advises that "models won't be available": true and
    # beside the point, as only its tokenizer is used. The user's own setting wins.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    fields = gguf.GGUFReader(str(path)).fields
    meta = {k: f.contents() for k, f in fields.items() if k.startswith(("tokenizer.", "general.arch"))}
    grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items()
                       if f"tokenizer.{key}" in meta}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    vocab, config = grouped["tokenizer"], grouped["tokenizer_config"]
    backend, _ = convert_gguf_tokenizer(meta["general.architecture"], vocab)
    special = {name: vocab["tokens"][meta[f"tokenizer.ggml.{key}"]] for name, key in _SPECIAL_TOKENS.items()
               if f"tokenizer.ggml.{key}" in meta}
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=config.get("chat_template"),
                                   **special)


TOKENIZER_CACHE_VERSION = 1  # bump when tokenizer_from_gguf_metadata changes what it builds


def tokenizer_cache_dir() -> Path:
    """Where tokenizers converted from GGUF files are kept ($SWIFTKV_JAX_TOKENIZER_CACHE, default
    ~/.cache/swiftkv-jax/tokenizers)."""
    from ..compile_cache import user_cache_dir
    return user_cache_dir("SWIFTKV_JAX_TOKENIZER_CACHE", "tokenizers")


def file_cache_key(path: Path, *versions: object) -> str:
    """A cache entry's name for what was converted from file `path`: changes with the file (path,
    size, mtime) and with each of `versions` (the converters' and libraries' versions)."""
    import hashlib
    st = path.stat()
    ident = "|".join(map(str, (path.resolve(), st.st_size, st.st_mtime_ns, *versions)))
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _cache_key(path: Path) -> str:
    """Changes with the file, transformers' version and our converter's."""
    import transformers
    return file_cache_key(path, transformers.__version__, TOKENIZER_CACHE_VERSION)


def cached_gguf_tokenizer(path: str | Path) -> Any:
    """tokenizer_from_gguf_metadata, converted once per file: reading 49k tokens out of a GGUF and
    converting them takes seconds, loading the saved fast tokenizer a fraction of one. The cache
    is a convenience: when it cannot be written the tokenizer is still returned."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    folder = tokenizer_cache_dir() / _cache_key(path)
    if (folder / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    tokenizer = tokenizer_from_gguf_metadata(path)
    try:
        from .weights import atomic_dir
        with atomic_dir(folder) as tmp:
            tokenizer.save_pretrained(str(tmp))
    except OSError:  # a read-only home: convert every time
        pass
    return tokenizer


def load_gguf_tokenizer(path: str | Path) -> Any:
    """The tokenizer embedded in a GGUF file (None if neither way can build one): first from its
    metadata without torch (cached on disk after the first time), then through transformers' own
    GGUF loader (which needs torch)."""
    path = Path(path)
    try:
        return cached_gguf_tokenizer(path)
    except Exception:  # an older/newer transformers without these converters
        pass
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception:
        return None
