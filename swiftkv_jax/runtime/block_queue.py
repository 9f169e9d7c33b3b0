"""Which KV block a request gets next: free blocks first, then the least recently used cached one.

Two structures on the device, both read and written a request at a time with a fixed number of
vectorised operations over that request's blocks (never a pass over the pool per block, never a
sort of the pool):
  * a free stack: blocks that hold nothing reusable and no row uses;
  * an eviction log: cached blocks no row uses, in the order they became idle (appended at the
    tail, popped at the head). An entry is live while its block's `stamp` still names the entry's
    position and the block is still idle and cached; a block used again (a prefix hit) or queued
    again simply leaves a stale entry behind, skipped when the head reaches it. When the tail
    reaches the end of the log, the live entries slide to its front (a pass over the log, once per
    about `capacity - live` appends).
vLLM keeps the same order with a doubly-linked list; here a linked list's per-block pointer updates
inside an XLA loop made XLA:CPU copy the whole list on every update (measured: slower than a
pass over the pool at 65,536 blocks), so the log is appended and consumed in vectors instead.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LOG_SLOTS_PER_BLOCK = 4  # log capacity: 4 entries per pool block, so slides are rare


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockQueue:
    """free_stack[:free_top] are free block ids; log_block[log_head:log_tail] the eviction log
    (oldest first); stamp[b] the position of block b's live log entry."""

    free_stack: jax.Array  # [num_blocks] int32
    free_top: jax.Array  # [] int32
    log_block: jax.Array  # [capacity] int32
    log_head: jax.Array  # [] int32
    log_tail: jax.Array  # [] int32
    stamp: jax.Array  # [num_blocks] int32, -1: no entry


def full_queue(num_blocks: int) -> BlockQueue:
    """Every block free (an empty pool), the log empty."""
    return BlockQueue(free_stack=jnp.arange(num_blocks - 1, -1, -1, dtype=jnp.int32),
                      free_top=jnp.int32(num_blocks),
                      log_block=jnp.zeros((LOG_SLOTS_PER_BLOCK * max(num_blocks, 1),), jnp.int32),
                      log_head=jnp.int32(0), log_tail=jnp.int32(0),
                      stamp=jnp.full((num_blocks,), -1, jnp.int32))


def _live(q: BlockQueue, positions: jax.Array, idle_cached: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(block ids at log `positions`, whether each entry is live); `idle_cached` [num_blocks]."""
    block = q.log_block[jnp.clip(positions, 0, q.log_block.size - 1)]
    live = ((positions >= q.log_head) & (positions < q.log_tail) & (q.stamp[block] == positions)
            & idle_cached[block])
    return block, live


def take(q: BlockQueue, count: jax.Array, idle_cached: jax.Array, size: int
         ) -> tuple[BlockQueue, jax.Array, jax.Array]:
    """Takes `count` (<= size) blocks: from the free stack first, then the log's oldest live
    entries. `idle_cached` [num_blocks]: cached and unreferenced (the caller has already counted
    this request's prefix hits as references). Returns (queue, the ids [size], how many came from
    the log: evictions). The caller checked that enough blocks are usable."""
    j = jnp.arange(size)
    from_free = jnp.minimum(count, q.free_top)
    free_ids = q.free_stack[jnp.clip(q.free_top - 1 - j, 0, q.free_stack.size - 1)]
    wanted = count - from_free

    def more(carry):
        pos, got, _ = carry
        return (got < wanted) & (pos < q.log_tail)

    def window(carry):  # the next `size` log entries: keep live ones until `wanted` are found
        pos, got, out = carry
        positions = pos + j
        block, live = _live(q, positions, idle_cached)
        rank = got + jnp.cumsum(live) - 1
        keep = live & (rank < wanted)
        out = out.at[jnp.where(keep, rank, size)].set(block, mode="drop")
        found = jnp.sum(keep)
        last = jnp.max(jnp.where(keep, positions, -1))
        pos = jnp.where(got + found >= wanted, last + 1, pos + size)
        return jnp.minimum(pos, q.log_tail), got + found, out

    head, evicted, log_ids = jax.lax.while_loop(
        more, window, (q.log_head, jnp.int32(0), jnp.zeros((size,), jnp.int32)))
    ids = jnp.where(j < from_free, free_ids, log_ids[jnp.clip(j - from_free, 0, size - 1)])
    q = dataclasses.replace(q, free_top=q.free_top - from_free, log_head=head)
    return q, jnp.where(j < count, ids, 0), evicted


def _last_occurrences(blocks: jax.Array, active: jax.Array) -> jax.Array:
    """active entries whose block no later active entry names. A block queued twice in one call
    (a prefix two rows shared) is queued once, at its last place: after both rows' deeper
    blocks, its children. So one call appends at most one entry per block."""
    key = jnp.where(active, blocks, jnp.iinfo(jnp.int32).max)[::-1]
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    first = jnp.concatenate([jnp.ones((1,), bool), sorted_key[1:] != sorted_key[:-1]])
    return active & jnp.zeros((blocks.size,), bool).at[order].set(first)[::-1]


def put(q: BlockQueue, blocks: jax.Array, to_log: jax.Array, to_free: jax.Array,
        idle_cached: jax.Array) -> BlockQueue:
    """Queues `blocks` [E] in their order: where `to_log`, at the log's tail (cached blocks that
    became idle, so the first one queued is evicted first); where `to_free`, on the free stack.
    A block queued again leaves its older entry stale. `idle_cached` (after this call's changes)
    decides which entries survive a slide. A block goes on the free stack at most once (it was
    referenced until this call)."""
    to_log = _last_occurrences(blocks, to_log)
    appended = jnp.sum(to_log)  # <= num_blocks: the log, 4 slots per block, has room after a slide
    q = jax.lax.cond(q.log_tail + appended > q.log_block.size, _slide, lambda q, _: q, q, idle_cached)
    drop_log, drop_block = q.log_block.size, q.stamp.size
    at = q.log_tail + jnp.cumsum(to_log) - 1
    top = q.free_top + jnp.cumsum(to_free) - 1
    return dataclasses.replace(
        q, log_block=q.log_block.at[jnp.where(to_log, at, drop_log)].set(blocks, mode="drop"),
        stamp=q.stamp.at[jnp.where(to_log, blocks, drop_block)].set(at, mode="drop"),
        log_tail=q.log_tail + appended,
        free_stack=q.free_stack.at[jnp.where(to_free, top, drop_block)].set(blocks, mode="drop"),
        free_top=q.free_top + jnp.sum(to_free))


def _slide(q: BlockQueue, idle_cached: jax.Array) -> BlockQueue:
    """The live log entries moved to the front of the log, in order (a pass over the log)."""
    positions = jnp.arange(q.log_block.size, dtype=jnp.int32)
    block, live = _live(q, positions, idle_cached)
    at = jnp.cumsum(live) - 1
    drop_log, drop_block = q.log_block.size, q.stamp.size
    return dataclasses.replace(
        q, log_block=jnp.zeros_like(q.log_block).at[jnp.where(live, at, drop_log)].set(block, mode="drop"),
        stamp=jnp.full_like(q.stamp, -1).at[jnp.where(live, block, drop_block)].set(at, mode="drop"),
        log_head=jnp.int32(0), log_tail=jnp.sum(live).astype(jnp.int32))
