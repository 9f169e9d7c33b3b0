"""Memory per device of params and KV cache under the partition rules, from the config alone."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ..config import ModelConfig
from ..model.params import abstract_weights
from .mesh import mesh_sizes, parse_mesh
from .partitioning import param_specs, pool_spec


def shard_bytes(shape: Sequence[int], itemsize: int, spec: P, sizes: Mapping[str, int]) -> int:
    """Bytes of one device's shard of an array of `shape` split by `spec`."""
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    per = [dim // (sizes[a] if a else 1) for dim, a in zip(shape, spec)]
    return math.prod(per) * itemsize


def memory_per_device(config: ModelConfig, mesh: Mesh | Mapping[str, int] | str,
                      dtype: Any = jnp.bfloat16, batch_size: int = 8, max_length: int = 8192,
                      pool_over_data: bool = False, teacher: bool = False) -> dict[str, int]:
    """Per-device bytes of params and of a KV pool of `batch_size` rows x `max_length` tokens
    under the partition rules, from the config alone (no arrays). `teacher`: count the original
    q/k/v_proj of SwiftKV layers >= L too (distillation keeps them; inference does not need them).
    Device memory also holds activations and XLA's temporaries, not counted here."""
    sizes = parse_mesh(mesh, _count(mesh)) if isinstance(mesh, str) else mesh_sizes(mesh)
    itemsize = jnp.dtype(dtype).itemsize
    weights = abstract_weights(config, dtype, teacher)
    specs = param_specs(weights, sizes, warn=False)
    size = lambda x: jnp.dtype(x.dtype).itemsize  # an int8 model's values and float32 scales
    param_bytes = sum(shard_bytes(x.shape, size(x), sp, sizes) for x, sp in zip(
        jax.tree.leaves(weights), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))))
    slots = batch_size * max_length
    pool = pool_spec(config.num_kv_heads, sizes, pool_over_data, slots)
    per_pool = shard_bytes((config.num_kv_heads, slots, config.head_dim), itemsize, pool, sizes)
    return {"params": param_bytes, "cache": 2 * config.num_cache_layers * per_pool,
            "params_total": sum(math.prod(x.shape) * size(x) for x in jax.tree.leaves(weights)),
            "cache_total": slots * config.kv_bytes_per_token(itemsize)}


def _count(spec: str) -> int:
    """Devices a fully specified mesh string names ("data=2,model=4" or "2x4")."""
    text = spec.replace(" ", "")
    if "=" in text:
        return math.prod(int(item.split("=")[1]) for item in text.split(",") if item)
    return math.prod(int(v) for v in text.lower().split("x"))
