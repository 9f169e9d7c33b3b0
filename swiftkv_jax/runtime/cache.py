"""The runtime's KV cache: the model's paged pools and block tables (model/paged_cache.py) plus
the prefix index over the pool's blocks (prefix_cache.py), as one pytree that every jitted step
takes and returns (donated, so the pools are updated in place).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..model.paged_cache import PagedCache, blocks_needed
from ..model.params import Params
from .prefix_cache import PrefixIndex, empty_index
from .prefix_cache import clear as clear_index
from .prefix_cache import stats as index_stats

DEFAULT_BLOCK_SIZE = 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class KVCache(PagedCache):
    """Paged KV cache (k, v, block_table, lengths, block_size: see PagedCache) with the prefix
    index over its blocks (prefix_cache.py): blocks other requests may reuse."""

    index: PrefixIndex

    def stats(self) -> dict[str, int | float]:
        """Prefix-cache counters: query/hit tokens, blocks in use/cached/free, evictions."""
        return index_stats(self.index)

    def clear(self) -> "KVCache":
        """The same memory with the prefix index emptied: nothing cached hits afterwards."""
        return dataclasses.replace(self, index=clear_index(self.index),
                                   lengths=jnp.zeros_like(self.lengths))


def init_cache(params: Params, batch_size: int, max_length: int, *,
               block_size: int = DEFAULT_BLOCK_SIZE, num_blocks: int | None = None,
               pool_bytes: int | None = None, dtype: jnp.dtype | None = None,
               hash_mask: int = 0xFFFFFFFF, prefix_cache: bool = True,
               mesh: jax.sharding.Mesh | None = None, pool_over_data: bool = False) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_length` tokens each.

    The pool holds `num_blocks` blocks of `block_size` tokens (or as many as fit in `pool_bytes`;
    default: one full row per batch row). Blocks beyond what the current request needs keep
    earlier prompts' KV for reuse (the prefix cache; `prefix_cache=False` switches it off: nothing
    is cached or reused). Layer slots are L + (N - L) / g.
    With a `mesh` (default: the mesh `params` are sharded on, if any), the pools are created
    sharded in place (kv heads over "model"; see sharding/partitioning.py) and the block table and lengths
    split over "data".
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a prompt token and a new one), got {max_length}")
    cfg = params.config
    dtype = jnp.dtype(dtype or params.dtype)
    blocks_per_row = blocks_needed(max_length, block_size)
    if pool_bytes is not None:
        num_blocks = pool_bytes // (block_size * cfg.kv_bytes_per_token(dtype.itemsize))
    num_blocks = batch_size * blocks_per_row if num_blocks is None else int(num_blocks)
    if num_blocks < blocks_per_row:
        raise ValueError(f"a pool of {num_blocks} blocks cannot hold one row of {max_length} tokens "
                         f"({blocks_per_row} blocks of {block_size}); give more blocks or bytes")
    shape = (cfg.num_kv_heads, num_blocks * block_size, cfg.head_dim)
    table = (jnp.arange(batch_size * blocks_per_row, dtype=jnp.int32) % num_blocks
             ).reshape(batch_size, blocks_per_row)
    if mesh is None:
        sharding = getattr(params.weights["norm"]["weight"], "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(sharding.mesh, jax.sharding.Mesh):
            mesh = sharding.mesh
    zeros = jnp.zeros
    if mesh is not None:  # each device allocates only its shard of the pools
        from ..sharding.partitioning import pool_spec, sharded_zeros
        spec = jax.sharding.NamedSharding(mesh, pool_spec(shape[0], mesh, pool_over_data, shape[1]))
        zeros = lambda shape, dtype: sharded_zeros(shape, dtype, spec)
    pools = lambda: [zeros(shape, dtype) for _ in range(cfg.num_cache_layers)]
    cache = KVCache(k=pools(), v=pools(), block_table=table,
                    lengths=jnp.zeros((batch_size,), jnp.int32),
                    index=empty_index(num_blocks, block_size, hash_mask, prefix_cache), block_size=block_size)
    if mesh is not None:
        from ..sharding.partitioning import shard_cache
        cache = shard_cache(cache, mesh, pool_over_data)
    return cache
