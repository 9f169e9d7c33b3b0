"""Where a layer's keys and values go and what it attends over: the paged cache, or the chunk alone.

A layer's K/V state `LayerKV` is a (k, v) pair threaded through the layer and returned updated.
`PagedKV` says where a chunk's tokens land in the pool and which blocks each row reads; `ChunkKV`
is the no-cache case (distillation, calibration): a layer attends to the chunk's own tokens and
its "state" is just the chunk's K/V. Both offer the same two pure functions, so a layer is written
once: `state = kv.write(state, k, v)` then `out = kv.read(state).attend(q, q_pos)`.

With the cache, a slot is written first (a scatter into its pool array), then attended over
straight from the pool (attention.attend_paged gathers one key tile at a time, only as far as the
rows hold): XLA updates the pool in place. Reading a pool and writing it later in the same
program made XLA copy it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .attention import attend, attend_paged

# (k, v): pools [K, slots, h] of one cache layer slot, or (no cache) the chunk's own [K, B, T, h].
LayerKV = tuple[jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class ChunkView:
    """Keys and values [K, B, S, h] as arrays, key j of row b at position `positions[b, j]`."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array

    def attend(self, q: jax.Array, q_pos: jax.Array) -> jax.Array:
        """Causal attention of q [B, T, H, h] at positions q_pos [B, T] over these keys."""
        return attend(q, self.k, self.v, q_pos, self.positions)


@dataclasses.dataclass(frozen=True)
class PagedView:
    """The rows of a paged cache layer: pools [K, slots, h] and each row's blocks in order."""

    k_pool: jax.Array
    v_pool: jax.Array
    block_table: jax.Array
    block_size: int

    def attend(self, q: jax.Array, q_pos: jax.Array) -> jax.Array:
        """Causal attention of q [B, T, H, h] over each row's keys up to its query positions."""
        return attend_paged(q, self.k_pool, self.v_pool, self.block_table, self.block_size, q_pos)


# What a layer attends over.
KVView = ChunkView | PagedView


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

    def read(self, state: LayerKV) -> ChunkView:
        """The chunk's own keys and values."""
        return ChunkView(state[0], state[1], self.positions)


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

    def read(self, state: LayerKV) -> PagedView:
        """Every row's keys and values, read from the pools as attention needs them."""
        return PagedView(state[0], state[1], self.block_table, self.block_size)
