"""Where a layer's keys and values go and what it attends over: the paged cache, or the chunk alone.

A layer's K/V state `LayerKV` is a (k, v) pair threaded through the layer and returned updated.
`PagedKV` says where a chunk's tokens land in the pool and which blocks each row reads; `ChunkKV`
is the no-cache case (distillation, calibration): a layer attends to the chunk's own tokens and
its "state" is just the chunk's K/V. Both offer the same two pure functions, so a layer is written
once: `state = kv.write(state, k, v)` then `keys, values, key_positions = kv.read(state)`.

With the cache, a slot is written first (a scatter into its pool array), then read (a gather of
each row's blocks): XLA does both in place. Reading a pool and writing it later in the same program
made XLA copy it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# (k, v): pools [K, slots, h] of one cache layer slot, or (no cache) the chunk's own [K, B, T, h].
LayerKV = tuple[jax.Array, jax.Array]
# What a layer attends over: keys, values [K, B, S, h] and the key positions [B, S].
KVView = tuple[jax.Array, jax.Array, jax.Array]


def _heads_first(x: jax.Array) -> jax.Array:
    """[B, T, K, h] -> [K, B, T, h], the layout attention and the pool use."""
    return x.transpose(2, 0, 1, 3)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkKV:
    """No cache: each layer attends to the chunk's own tokens at `positions` [B, T]."""

    positions: jax.Array

    def write(self, state: LayerKV | None, k: jax.Array, v: jax.Array) -> LayerKV:
        """The chunk's K/V [B, T, K, h] become the layer's state (there is nothing to keep)."""
        del state
        return _heads_first(k), _heads_first(v)

    def read(self, state: LayerKV) -> KVView:
        """The chunk's own keys and values."""
        return state[0], state[1], self.positions


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKV:
    """A chunk appended to the rows of a paged cache (cache.py).

    write_slots: [B, T] pool slot of each chunk token (num_slots for padding: the write is dropped)
    block_table: [B, blocks_per_row] each row's blocks, in order
    """

    write_slots: jax.Array
    block_table: jax.Array
    block_size: int = dataclasses.field(metadata=dict(static=True))

    def write(self, state: LayerKV, k: jax.Array, v: jax.Array) -> LayerKV:
        """The pools with the chunk's K/V [B, T, K, h] scattered into its slots."""
        put = lambda pool, x: pool.at[:, self.write_slots].set(_heads_first(x), mode="drop")
        return put(state[0], k), put(state[1], v)

    def read(self, state: LayerKV) -> KVView:
        """Every row's keys and values [K, B, max_length, h], position = index in the row."""
        b, blocks = self.block_table.shape
        # Gather whole blocks (contiguous block_size x head_dim runs), not single token slots.
        rows = lambda pool: pool.reshape(pool.shape[0], -1, self.block_size, pool.shape[-1])[
            :, self.block_table].reshape(pool.shape[0], b, blocks * self.block_size, -1)
        positions = jnp.broadcast_to(jnp.arange(blocks * self.block_size, dtype=jnp.int32),
                                     (b, blocks * self.block_size))
        return rows(state[0]), rows(state[1]), positions
