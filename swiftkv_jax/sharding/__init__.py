"""Beyond one device: the public face of mesh.py (the mesh, multi-host start-up), partitioning.py
(partition specs for params, cache, batches, train state) and memory.py (bytes per device).

Everything runs on JAX's own SPMD engine: arrays carry a NamedSharding over a 2-D mesh
("data", "model") and the unchanged jitted functions (`prefill`, the `decode` while_loop, the
prefix-cache `admit`/`register`, the distillation step) are partitioned by XLA (GSPMD), which
inserts the collectives. No hand-written communication. See partitioning.py for the rules.
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

from ..model.params import abstract_weights
from .memory import memory_per_device, shard_bytes
from .mesh import AXES, DATA, MODEL, ShardingError, initialize_distributed, make_mesh, mesh_sizes, parse_mesh
from .partitioning import (
                   LOGICAL_RULES,
                   ShardingFallbackWarning,
                   cache_shardings,
                   cache_specs,
                   fit_spec,
                   logical_spec,
                   named,
                   param_spec,
                   param_specs,
                   params_shardings,
                   path_name,
                   pool_spec,
                   restore_target,
                   shard_batch,
                   shard_cache,
                   shard_like,
                   shard_params,
                   sharded_zeros,
                   train_state_shardings,
                   train_state_specs,
)

__all__ = [
    "AXES", "DATA", "LOGICAL_RULES", "MODEL", "P", "ShardingError", "ShardingFallbackWarning",
    "abstract_weights", "cache_shardings", "cache_specs", "fit_spec", "initialize_distributed",
    "logical_spec", "make_mesh", "memory_per_device", "mesh_sizes", "named", "param_spec",
    "param_specs", "params_shardings", "parse_mesh", "path_name", "pool_spec", "restore_target",
    "shard_batch", "shard_bytes", "shard_cache", "shard_like", "shard_params", "sharded_zeros",
    "train_state_shardings", "train_state_specs",
]
