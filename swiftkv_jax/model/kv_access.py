"""Where a layer's keys and values go and what it attends over: the paged cache, or the chunk alone.

A layer's K/V state `LayerKV` is a (k, v) pair threaded through the layer and returned updated.
`PackedKV` says where a pass's tokens land in the pool and which blocks each row reads (the tokens
of one or more batches of cache rows lie packed on one axis, so every matmul runs once over all
of them: a prefill chunk and the running rows' decode tokens share a pass); `ChunkKV` is the
no-cache case (distillation, calibration): a layer attends to the chunk's own tokens and
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkView:
    """Keys and values [K, B, S, h] as arrays, key j of row b at position `positions[b, j]`."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array

    def attend(self, q: jax.Array, q_pos: jax.Array) -> jax.Array:
        """Causal attention of q [B, T, H, h] at positions q_pos [B, T] over these keys."""
        return attend(q, self.k, self.v, q_pos, self.positions)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedView:
    """The rows of a paged cache layer: pools [K, slots, h] and each row's blocks in order."""

    k_pool: jax.Array
    v_pool: jax.Array
    block_table: jax.Array
    block_size: int = dataclasses.field(metadata=dict(static=True))

    def attend(self, q: jax.Array, q_pos: jax.Array) -> jax.Array:
        """Causal attention of q [B, T, H, h] over each row's keys up to its query positions."""
        return attend_paged(q, self.k_pool, self.v_pool, self.block_table, self.block_size, q_pos)




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


def _scatter(state: LayerKV, write_slots: jax.Array, k: jax.Array, v: jax.Array) -> LayerKV:
    """The pools with K/V [B, T, K, h] scattered into `write_slots` [B, T] (out of range: dropped).

    A scatter of one token XLA rewrites as a select and a dynamic-update-slice, and then copies
    the whole pool around it (every layer, every decode step: a batch-1 engine step in an 8-slot
    cache measured 40 -> 23 ms); a second, dropped index keeps it a scatter, updated in place."""
    def put(pool: jax.Array, x: jax.Array) -> jax.Array:
        slots, x = write_slots.reshape(-1), x.reshape((-1,) + x.shape[2:]).transpose(1, 0, 2)
        if slots.shape[0] == 1:  # [K, tokens, h] values; the extra index is past the pool
            slots = jnp.concatenate([slots, jnp.full((1,), pool.shape[1], slots.dtype)])
            x = jnp.concatenate([x, x], axis=1)
        return pool.at[:, slots].set(x, mode="drop")

    return put(state[0], k), put(state[1], v)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedView:
    """Rows of several batches, packed on one token axis, over the same pools: segment i is
    `shapes[i]` = (rows, tokens per row) with block tables `tables[i]`."""

    k_pool: jax.Array
    v_pool: jax.Array
    tables: tuple[jax.Array, ...]
    shapes: tuple[tuple[int, int], ...] = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))

    def attend(self, q: jax.Array, q_pos: jax.Array) -> jax.Array:
        """Causal attention of q [1, N, H, h] at q_pos [1, N], each segment over its own rows."""
        out, start = [], 0
        for table, (b, t) in zip(self.tables, self.shapes):
            qs, ps = q[0, start:start + b * t], q_pos[0, start:start + b * t]
            o = attend_paged(qs.reshape((b, t) + q.shape[2:]), self.k_pool, self.v_pool, table,
                             self.block_size, ps.reshape(b, t))
            out.append(o.reshape(qs.shape))
            start += b * t
        return jnp.concatenate(out)[None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedKV:
    """Several batches of cache rows in one forward pass (the engine's mixed step: a prefill chunk
    [P, W] and one decode token for each of R rows). Their tokens lie on one axis [1, N], so every
    matmul runs once over all N; attention splits them back into the segments (PackedView).

    write_slots: [1, N] pool slot of each token (num_slots for padding: dropped)
    tables:      per segment, [rows, blocks_per_row] each row's blocks in order
    shapes:      per segment, (rows, tokens per row); N = sum of rows * tokens
    """

    write_slots: jax.Array
    tables: tuple[jax.Array, ...]
    shapes: tuple[tuple[int, int], ...] = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))

    def write(self, state: LayerKV, k: jax.Array, v: jax.Array) -> LayerKV:
        """The pools with the packed tokens' K/V [1, N, K, h] scattered into their slots."""
        return _scatter(state, self.write_slots, k, v)

    def read(self, state: LayerKV) -> PackedView:
        """Each segment's rows, read from the pools as attention needs them."""
        return PackedView(state[0], state[1], self.tables, self.shapes, self.block_size)


# What a layer attends over.
KVView = ChunkView | PagedView | PackedView
