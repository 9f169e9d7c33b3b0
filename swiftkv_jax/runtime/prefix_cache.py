"""Prefix index over the KV block pool: prompts that begin like earlier ones reuse their blocks.

Everything lives on device, in the cache pytree, and every operation is a jitted function over
fixed-size arrays (no host-side hash map):
  * a full block is identified by a chain hash of (parent hash, its tokens, the weights'
    namespace); a hit also checks the stored tokens, the parent block and the namespace, so a hash
    collision can cost a miss but never a wrong answer;
  * registered blocks are found through an open-addressing hash table (`PROBES` slots from the
    hash, at least two slots per block), so a lookup or a registration reads a fixed number of
    blocks whatever the pool's size (a scan of the whole pool cost 37 ms per 1000-token admission
    at 65,536 blocks on a 2-core EPYC); a block whose probe slots are all taken stays unregistered
    (a later miss, never a wrong answer), and so do its descendants;
  * blocks carry ref counts (rows using them); a block no row uses waits in the block queue
    (block_queue.py): on a free stack, or cached in an eviction log in the order it became idle.
    Allocation takes free blocks first, then evicts the least recently used cached block; a
    request's chain is queued tail first, and the chain blocks it found registered by another
    request are queued again with it, so a child leaves the cache before its parent. Admission,
    publication and release cost a fixed number of steps per block of the request, plus a few
    vectorised passes over the pool's flags (bench_prefix_index.py).
A request calls admit() before its prefill, publish() as its blocks are written and register()
when it ends (publish, then release its blocks, queueing its chain); release() alone drops
references without publishing. Users call stats/clear.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .block_queue import BlockQueue, full_queue, put, take

U32 = jnp.uint32
NO_PARENT = -1
PROBES = 16  # hash-table slots a lookup or a registration tries (linear probing)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefixIndex:
    """Per-block metadata of the pool ([num_blocks] unless noted) plus counters.

    `hash_mask` narrows hashes (tests force collisions with a tiny range). With `enabled` False
    the index only allocates: lookups find nothing and publish registers nothing, so every block
    is free again when its request ends (the prefix cache switched off, e.g. to measure it).
    """

    block_hash: jax.Array  # uint32
    block_tokens: jax.Array  # [num_blocks, block_size] int32, the tokens a cached block holds
    block_parent: jax.Array  # int32 block id of the previous block of the chain, -1 for a root
    block_parent_gen: jax.Array  # int32 generation of that parent when this block was registered
    block_gen: jax.Array  # int32, +1 each time the block is handed out anew: a recycled parent
                          # id never matches a child registered under its earlier content
    block_depth: jax.Array  # int32 position of the block in its chain
    block_namespace: jax.Array  # uint32 namespace of the weights that computed the block
    registered: jax.Array  # bool: holds verified, reusable KV
    ref_count: jax.Array  # int32: rows of the current request using the block
    last_used: jax.Array  # int32 clock value when the block was last handed out or queued
    queue: BlockQueue  # the free blocks and the idle cached ones, in the order they are taken
    clock: jax.Array  # [] int32, +1 per request
    counters: jax.Array  # [3] int32: query tokens, hit tokens, evictions
    table_block: jax.Array  # [T] int32 hash table: a block id (-1: empty), T a power of two
    table_hash: jax.Array  # [T] uint32, the hash the entry was made for (live while its block is
                           # registered under that hash)
    hash_mask: int = dataclasses.field(default=0xFFFFFFFF, metadata=dict(static=True))
    enabled: bool = dataclasses.field(default=True, metadata=dict(static=True))


def empty_index(num_blocks: int, block_size: int, hash_mask: int = 0xFFFFFFFF,
                enabled: bool = True) -> PrefixIndex:
    """An index over `num_blocks` pool blocks with nothing cached (init_cache makes one); with
    `enabled` False it never caches (see PrefixIndex)."""
    zeros = lambda dtype=jnp.int32: jnp.zeros((num_blocks,), dtype)
    slots = 1 << max(PROBES, 2 * num_blocks - 1).bit_length()
    return PrefixIndex(block_hash=zeros(U32), block_tokens=jnp.zeros((num_blocks, block_size), jnp.int32),
                       block_parent=zeros(), block_parent_gen=zeros(), block_gen=zeros(),
                       block_depth=zeros(), block_namespace=zeros(U32),
                       registered=zeros(jnp.bool_), ref_count=zeros(), last_used=zeros(),
                       queue=full_queue(num_blocks), clock=jnp.int32(0),
                       counters=jnp.zeros((3,), jnp.int32),
                       table_block=jnp.full((slots,), -1, jnp.int32), table_hash=jnp.zeros((slots,), U32),
                       hash_mask=hash_mask, enabled=enabled)


def _mix(h: jax.Array, x: jax.Array) -> jax.Array:
    """One step of a 32-bit multiplicative hash (murmur3-style finaliser on h ^ x)."""
    h = (h ^ x.astype(U32)) * U32(0x9E3779B1)
    h = h ^ (h >> 15)
    h = h * U32(0x85EBCA77)
    return h ^ (h >> 13)


def chain_hashes(tokens: jax.Array, block_size: int, namespace: jax.Array, mask: int) -> jax.Array:
    """[blocks] hashes of the full blocks of one row of tokens, each chained on its parent's."""
    blocks = tokens.reshape(-1, block_size).astype(U32)
    # Each token mixed with its offset, summed: all blocks' contents hashed at once.
    offsets = jnp.arange(block_size, dtype=U32) * U32(0x9E3779B9)
    content = jnp.sum(_mix(offsets, blocks), axis=1, dtype=U32)

    def chain(parent, c):
        h = _mix(parent, c) & U32(mask)
        return h, h

    _, hashes = jax.lax.scan(chain, _mix(U32(0x811C9DC5), namespace), content)
    return hashes


def weights_namespace(weights) -> jax.Array:
    """A uint32 fingerprint of the weights from a strided sample of every tensor: new weights
    (another checkpoint, a training step) give a new namespace, so they never hit old blocks.
    All samples are mixed in one loop (one per tensor took seconds to trace for 272 tensors)."""
    words = []
    for leaf in jax.tree.leaves(weights):
        flat = leaf.reshape(-1)
        sample = flat[:: max(1, flat.size // 61)][:64].astype(jnp.float32)
        words += [jnp.full((1,), flat.size, U32), jax.lax.bitcast_convert_type(sample, U32)]
    words = jnp.concatenate(words)
    return jax.lax.fori_loop(0, words.size, lambda i, h: _mix(h, words[i]), U32(0x12345678))


def _generation(idx: PrefixIndex, block: jax.Array) -> jax.Array:
    """Generation of block id `block` (0 for the root's parent, -1)."""
    return jnp.where(block < 0, 0, idx.block_gen[jnp.maximum(block, 0)])


def _probe(idx: PrefixIndex, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The PROBES table slots of hash `h`: (slots, their block ids clipped to >= 0, whether each
    entry is live: it names a block registered under this entry's hash)."""
    slots = (h + jnp.arange(PROBES, dtype=U32)).astype(jnp.int32) & (idx.table_block.size - 1)
    entry = idx.table_block[slots]
    block = jnp.maximum(entry, 0)
    live = (entry >= 0) & idx.registered[block] & (idx.block_hash[block] == idx.table_hash[slots])
    return slots, block, live


def _matching_block(idx: PrefixIndex, h: jax.Array, parent: jax.Array, block: jax.Array,
                    namespace: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(found, block id) of a registered block with this hash, parent (id and generation),
    tokens and namespace: the live entries of h's probe slots, each verified."""
    _, ids, live = _probe(idx, h)
    match = (live & (idx.block_hash[ids] == h) & (idx.block_parent[ids] == parent)
             & (idx.block_parent_gen[ids] == _generation(idx, parent))
             & (idx.block_namespace[ids] == namespace) & jnp.all(idx.block_tokens[ids] == block, axis=1))
    return jnp.any(match), ids[jnp.argmax(match)]


def lookup(idx: PrefixIndex, tokens: jax.Array, max_blocks: jax.Array, block_size: int,
           namespace: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Longest verified cached prefix of one row: (number of blocks, their ids [blocks_per_row])."""
    hashes = chain_hashes(tokens, block_size, namespace, idx.hash_mask)
    blocks = tokens.reshape(-1, block_size)

    def step(carry, xs):
        n, prev, alive = carry
        j, h, block = xs
        found, bid = _matching_block(idx, h, prev, block, namespace)
        alive = alive & found & (j < max_blocks)
        return (n + alive, jnp.where(alive, bid, prev), alive), jnp.where(alive, bid, 0)

    init = (jnp.int32(0), jnp.int32(NO_PARENT), jnp.bool_(True))
    (n, _, _), ids = jax.lax.scan(step, init, (jnp.arange(hashes.size), hashes, blocks))
    return n, ids


def _idle_cached(idx: PrefixIndex) -> jax.Array:
    """[num_blocks] cached blocks no row uses: the ones eviction may take."""
    return idx.registered & (idx.ref_count == 0)


@jax.jit
def admit(idx: PrefixIndex, block_table: jax.Array, tokens: jax.Array, prompt_lengths: jax.Array,
          blocks_needed: jax.Array, namespace: jax.Array
          ) -> tuple[PrefixIndex, jax.Array, jax.Array, jax.Array]:
    """Gives each row its cached prefix blocks and fresh blocks for the rest of its request.

    tokens [B, max_length] (prompts, zero padded), prompt_lengths [B] (0 = unused row),
    blocks_needed [B] blocks for prompt + new tokens. Returns (index, block_table, cached prompt
    tokens per row, ok). At least one prompt token per row is left to compute. The request is
    admitted when the blocks no row uses could hold all its blocks without counting its hits (the
    engine's scheduler reserves the same way); otherwise ok is False and the index and table come
    back unchanged.
    """
    block_size = tokens.shape[1] // block_table.shape[1]
    per_row = block_table.shape[1]
    ok = jnp.sum(blocks_needed) <= idx.queue.free_top + jnp.sum(_idle_cached(idx))
    clock = jnp.where(ok, idx.clock + 1, idx.clock)
    drop = idx.ref_count.size  # out of range: a masked entry is dropped

    def row(idx, xs):
        toks, length, needed = xs
        max_hit = jnp.where((length > 0) & idx.enabled & ok, (length - 1) // block_size, 0)
        n_hit, hit_ids = lookup(idx, toks, max_hit, block_size, namespace)
        j = jnp.arange(per_row)
        is_hit = j < n_hit
        # The hits are this row's first: referenced before the queue is asked for the rest.
        ref_count = idx.ref_count.at[jnp.where(is_hit, hit_ids, drop)].add(1, mode="drop")
        idx = dataclasses.replace(idx, ref_count=ref_count)
        n_new = jnp.where(ok, jnp.maximum(needed - n_hit, 0), 0)
        queue, fresh, evicted = take(idx.queue, n_new, _idle_cached(idx), per_row)
        is_new = (j >= n_hit) & (j < needed) & ok
        table = jnp.where(is_hit, hit_ids, jnp.where(is_new, fresh[jnp.clip(j - n_hit, 0, per_row - 1)], 0))
        new, used = jnp.where(is_new, table, drop), jnp.where(is_hit | is_new, table, drop)
        counts = jnp.stack([length, n_hit * block_size, evicted]).astype(jnp.int32)
        idx = dataclasses.replace(
            idx, queue=queue,
            ref_count=idx.ref_count.at[new].add(1, mode="drop"),
            last_used=idx.last_used.at[used].set(clock, mode="drop"),
            registered=idx.registered.at[new].set(False, mode="drop"),
            block_gen=idx.block_gen.at[new].add(1, mode="drop"),
            counters=idx.counters + jnp.where(ok, counts, 0))
        return idx, (table, n_hit * block_size)

    idx, (table, hit_tokens) = jax.lax.scan(row, idx, (tokens, prompt_lengths, blocks_needed))
    idx = dataclasses.replace(idx, clock=clock)
    return idx, jnp.where(ok, table, block_table), jnp.where(ok, hit_tokens, 0), ok


@jax.jit
def publish(idx: PrefixIndex, block_table: jax.Array, tokens: jax.Array, lengths: jax.Array,
            namespace: jax.Array) -> PrefixIndex:
    """Registers every full block whose KV is written, so later requests can reuse it at once
    (the engine publishes a prompt's blocks chunk by chunk, while the request still runs).

    tokens [B, max_length] hold each row's prompt and generated tokens; lengths [B] how many have
    their KV in the cache. A block already registered (by this row earlier, or first by another
    row that computed the same tokens) stays the chain's block. References are left as they are.
    """
    return _publish(idx, block_table, tokens, lengths, namespace)[0]


def _publish(idx: PrefixIndex, block_table: jax.Array, tokens: jax.Array, lengths: jax.Array,
             namespace: jax.Array) -> tuple[PrefixIndex, jax.Array]:
    """publish(), and each row's chain [B, blocks_per_row]: per block, the registered block that
    holds its tokens (its own, or the one another row registered first), else its own."""
    if not idx.enabled:
        return idx, block_table
    block_size = tokens.shape[1] // block_table.shape[1]

    def row(idx, xs):
        toks, table, length = xs
        hashes = chain_hashes(toks, block_size, namespace, idx.hash_mask)

        def block(carry, xs):
            idx, prev, chained = carry
            j, h, bid, content = xs
            full = j < length // block_size
            found, existing = _matching_block(idx, h, prev, content, namespace)
            slots, _, live = _probe(idx, h)
            room = jnp.any(~live)
            # Registered only under a registered parent, and with a free probe slot for its entry.
            new = full & ~found & chained & room
            at = jnp.where(new, bid, idx.registered.size)
            slot = jnp.where(new, slots[jnp.argmin(live)], idx.table_block.size)
            idx = dataclasses.replace(
                idx,
                block_hash=idx.block_hash.at[at].set(h, mode="drop"),
                block_tokens=idx.block_tokens.at[at].set(content, mode="drop"),
                block_parent=idx.block_parent.at[at].set(prev, mode="drop"),
                block_parent_gen=idx.block_parent_gen.at[at].set(_generation(idx, prev), mode="drop"),
                block_depth=idx.block_depth.at[at].set(j, mode="drop"),
                block_namespace=idx.block_namespace.at[at].set(namespace, mode="drop"),
                registered=idx.registered.at[at].set(True, mode="drop"),
                table_block=idx.table_block.at[slot].set(bid, mode="drop"),
                table_hash=idx.table_hash.at[slot].set(h, mode="drop"))
            chain_block = jnp.where(full & found, existing, bid)
            return (idx, chain_block, chained & (found | new | ~full)), chain_block

        xs = (jnp.arange(table.size), hashes, table, toks.reshape(-1, block_size))
        (idx, _, _), chain = jax.lax.scan(block, (idx, jnp.int32(NO_PARENT), jnp.bool_(True)), xs)
        return idx, chain

    return jax.lax.scan(row, idx, (tokens, block_table, lengths))


@jax.jit
def release(idx: PrefixIndex, block_table: jax.Array, blocks_used: jax.Array) -> PrefixIndex:
    """Drops the rows' references to the first `blocks_used` [B] blocks of their tables (those
    admit() gave them): unregistered blocks become free, registered ones stay cached for reuse."""
    return _release(idx, block_table, block_table, blocks_used)


def _release(idx: PrefixIndex, block_table: jax.Array, chain: jax.Array, blocks_used: jax.Array
             ) -> PrefixIndex:
    """release(), queueing each row's `chain` (see _publish) deepest block first: a block no row
    uses any more goes on the free stack if it holds nothing reusable, else to the eviction log,
    and so does a chain block another row registered that is idle (queued again, after its
    children)."""
    used = jnp.arange(block_table.shape[1]) < blocks_used[:, None]
    drop = idx.ref_count.size
    ref_count = idx.ref_count.at[jnp.where(used, block_table, drop).reshape(-1)].add(-1, mode="drop")
    idx = dataclasses.replace(idx, ref_count=ref_count)
    idle = idx.ref_count == 0
    deepest_first = lambda x: x[:, ::-1].reshape(-1)
    own, links, live = deepest_first(block_table), deepest_first(chain), deepest_first(used)
    to_log = live & idx.registered[links] & idle[links]
    to_free = live & ~idx.registered[own] & idle[own]
    nothing = jnp.zeros_like(live)
    queue = put(idx.queue, jnp.concatenate([links, own]), jnp.concatenate([to_log, nothing]),
                jnp.concatenate([nothing, to_free]), _idle_cached(idx))
    last_used = idx.last_used.at[jnp.where(to_log, links, drop)].set(idx.clock, mode="drop")
    return dataclasses.replace(idx, queue=queue, last_used=last_used)


@jax.jit
def register(idx: PrefixIndex, block_table: jax.Array, tokens: jax.Array, lengths: jax.Array,
             blocks_used: jax.Array, namespace: jax.Array) -> PrefixIndex:
    """After a request: publishes every written full block (first writer wins when two rows
    computed the same block), then releases the rows' references, queueing each row's chain."""
    idx, chain = _publish(idx, block_table, tokens, lengths, namespace)
    return _release(idx, block_table, chain, blocks_used)


@jax.jit
def clear(idx: PrefixIndex) -> PrefixIndex:
    """Forgets every cached block (the pool's memory stays allocated): every block is free."""
    return dataclasses.replace(idx, registered=jnp.zeros_like(idx.registered),
                               ref_count=jnp.zeros_like(idx.ref_count),
                               queue=full_queue(idx.registered.size))


def stats(idx: PrefixIndex) -> dict[str, int | float]:
    """Counters a user can read: tokens queried and hit, blocks in use / cached / free, evictions."""
    registered, refs = np.asarray(idx.registered), np.asarray(idx.ref_count)
    query, hit, evictions = (int(x) for x in np.asarray(idx.counters))
    return {"query_tokens": query, "hit_tokens": hit, "hit_rate": hit / query if query else 0.0,
            "blocks_in_use": int((refs > 0).sum()), "blocks_cached": int((registered & (refs == 0)).sum()),
            "blocks_free": int((~registered & (refs == 0)).sum()), "evictions": evictions,
            "requests": int(idx.clock)}
