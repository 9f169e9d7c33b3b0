"""Weights in and out: Hugging Face safetensors (llama, llama_swiftkv), GGUF, our orbax folders.

The only place that knows Hugging Face tensor names. HF Linear weights are [out, in]; ours are
[in, out] with heads split out (q_proj [D, H, h], o_proj [H, h, D]), so loading is a transpose
and a reshape per tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..config import ModelConfig
from ..model import int8
from ..model.params import Params, Tensor, empty_weights, get_path, set_path, tensors

PARAMS_SUBDIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")


class WeightsError(ValueError):
    """Weights that are missing, mis-shaped or in a format this library cannot read."""


# -- HF names <-> our pytree: both directions derived from params.SCHEMA ---------------------

def params_from_tensors(cfg: ModelConfig, get: Callable[[str], np.ndarray], names: Iterable[str],
                        dtype: Any = jnp.float32, progress: bool = True) -> Params:
    """Builds Params from HF-named tensors; `get(name)` returns one [out, in] array.

    Every tensor the config needs must be present with its exact shape; the error names it.
    The original q/k/v_proj of SwiftKV layers >= L are optional (only distillation uses them).
    """
    names = set(names)
    L, n, g = cfg.num_key_value_layers, cfg.num_layers, cfg.key_value_group_size
    np_dtype = jnp.dtype(dtype)
    bar = tqdm(total=len(names), desc="loading weights", unit="tensor", disable=not progress,
               leave=False)

    def fetch(name: str, t: Tensor) -> np.ndarray:
        if name not in names:
            raise WeightsError(f"tensor {name!r} is missing from the checkpoint (its config needs it: "
                               f"{n} layers, hidden {cfg.hidden_size}, SwiftKV L={L}, g={g})")
        w = np.asarray(get(name))
        if tuple(w.shape) != t.hf_shape:
            raise WeightsError(f"tensor {name!r} has shape {tuple(w.shape)} but the config needs "
                               f"{t.hf_shape}; do config.json and the weights belong together?")
        bar.update()
        return t.from_hf(w.astype(np.float32)).astype(np_dtype)

    weights = empty_weights(cfg)
    for t in tensors(cfg):
        if t.optional and not set(t.hf_names) <= names:
            continue
        slices = [fetch(name, t) for name in t.hf_names]
        set_path(weights, t.path, np.stack(slices) if t.kind.stacked else slices[0])
    bar.close()
    return Params(jax.tree.map(jnp.asarray, weights), cfg)


def params_to_tensors(params: Params) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, [out, in] float32 array) for every tensor, in llama / llama_swiftkv layout."""
    host = lambda x: np.asarray(jax.device_get(x), np.float32)
    for t in tensors(params.config):
        try:
            x = host(get_path(params.weights, t.path))
        except KeyError:  # a teacher-only tensor this checkpoint does not hold
            continue
        slices = x if t.kind.stacked else [x]
        for name, part in zip(t.hf_names, slices, strict=True):
            yield name, t.to_hf(part)


# -- Hugging Face folders ------------------------------------------------------------------------

def _safetensors_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, for a single or sharded (index json) safetensors checkpoint."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder} holds no *.safetensors weights (nor an index json); "
                           "point to a Hugging Face model folder, a .gguf file or a converted folder")
    from safetensors import safe_open
    out = {}
    for file in files:
        with safe_open(file, "numpy") as f:
            out.update({name: file for name in f.keys()})
    return out


def load_hf_folder(folder: str | Path, dtype: Any = jnp.float32, progress: bool = True) -> Params:
    """Params from a Hugging Face folder: config.json plus single or sharded safetensors."""
    from safetensors import safe_open
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise WeightsError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    cfg = ModelConfig.from_json_file(folder / "config.json")
    where = _safetensors_index(folder)
    handles: dict[Path, Any] = {}

    def get(name: str) -> np.ndarray:
        file = where[name]
        if file not in handles:
            handles[file] = safe_open(file, "pt" if _is_bf16(file) else "numpy")
        t = handles[file].get_tensor(name)
        return t.float().numpy() if hasattr(t, "float") else t

    return params_from_tensors(cfg, get, where.keys(), dtype, progress)


def _is_bf16(file: Path) -> bool:
    """numpy cannot hold bfloat16 safetensors; those are read through torch when it is present."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n).decode()
    return '"BF16"' in header


def save_hf_folder(params: Params, folder: str | Path, tokenizer: Any = None) -> None:
    """Writes config.json and model.safetensors (llama or llama_swiftkv) atomically; int8 params
    are written as float (the Hugging Face formats have no such int8 layout)."""
    from safetensors.numpy import save_file
    folder, params = Path(folder), params.dequantize()
    with atomic_dir(folder) as tmp:
        tensors = {name: np.ascontiguousarray(arr) for name, arr in params_to_tensors(params)}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(params.config.to_hf_dict(), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


# -- our orbax folders ---------------------------------------------------------------------------

class atomic_dir:
    """Builds a folder under a temporary name beside `target` and renames it into place."""

    def __init__(self, target: Path):
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.rename(self.target, old)
            os.rename(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.target)


def save_checkpoint(params: Params, folder: str | Path, tokenizer: Any = None) -> None:
    """Our checkpoint folder: config.json, an orbax `params/` tree, and the tokenizer files."""
    import orbax.checkpoint as ocp
    folder = Path(folder).absolute()
    with atomic_dir(folder) as tmp:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / PARAMS_SUBDIR, int8.to_dicts(params.weights))
        (tmp / "config.json").write_text(json.dumps(params.config.to_hf_dict(), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


def is_checkpoint(folder: Path) -> bool:
    """True for our own checkpoint folder (config.json and an orbax params/ tree)."""
    return (folder / PARAMS_SUBDIR).is_dir() and (folder / "config.json").exists()


def load_checkpoint(folder: str | Path, dtype: Any = None, sharding: Any = None) -> Params:
    """Restores our checkpoint straight onto device (or onto `sharding`), optionally casting its
    float weights (an int8 checkpoint's int8 values and float32 scales stay as saved).

    `sharding`: one Sharding for every tensor, a `jax.sharding.Mesh` (each tensor restored onto
    its shard by sharding/partitioning.py's rules: no full copy on one device), or a pytree of
    Shardings shaped like the weights."""
    import orbax.checkpoint as ocp
    folder = Path(folder).absolute()
    cfg = ModelConfig.from_json_file(folder / "config.json")
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(folder / PARAMS_SUBDIR).item_metadata
        if isinstance(sharding, jax.sharding.Mesh):
            from ..sharding.partitioning import params_shardings
            sharding = params_shardings(meta, sharding)
        if sharding is None or isinstance(sharding, jax.sharding.Sharding):
            sharding = jax.tree.map(
                lambda _: sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0]), meta)
        paths, treedef = jax.tree_util.tree_flatten_with_path(meta)
        shardings = jax.tree.leaves(sharding, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        if len(shardings) != len(paths):
            raise WeightsError(f"{len(shardings)} shardings given for {len(paths)} tensors in {folder}")

        def restored_dtype(path, m):
            scales = getattr(path[-1], "key", None) == "scales"
            return dtype if dtype and jnp.issubdtype(m.dtype, jnp.floating) and not scales else m.dtype

        target = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(
            tuple(m.shape), restored_dtype(path, m), sharding=s)
            for (path, m), s in zip(paths, shardings)])
        weights = ckpt.restore(folder / PARAMS_SUBDIR, target)
    return Params(int8.from_dicts(weights), cfg)
