"""The paged KV memory the model reads and writes: a pool of fixed-size blocks shared by all rows
and a block table per row.

Keys and values live in one pool array per cache layer slot, [kv_heads, token slots, head_dim],
token slot = `block * block_size + offset`. A row's block table lists the blocks that hold its
tokens in order, so rows may share blocks and memory is fixed. Per-slot arrays rather than one
stacked array: XLA updates each in place, where scattering into a stacked pool that other layers
also read made it copy the whole pool (measured: a 4x slower decode step at batch 8 x 2048
tokens). How blocks are shared and reused (the prefix index) is the runtime's business
(runtime/cache.py extends this record with it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .kv_access import LayerKV


def blocks_needed(tokens: int, block_size: int) -> int:
    """KV blocks that hold `tokens` tokens (works on numpy arrays of counts too)."""
    return -(-tokens // block_size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class PagedCache:
    """Paged KV pools and the rows' views of them.

    k, v:        one array per cache layer slot (L + (N - L) / g of them), each
                 [kv_heads, num_blocks * block_size, head_dim]
    block_table: [batch, blocks_per_row] int32, block ids of each row's tokens in order
    lengths:     [batch] int32, tokens of each row currently held
    """

    k: list[jax.Array]
    v: list[jax.Array]
    block_table: jax.Array
    lengths: jax.Array
    block_size: int = dataclasses.field(metadata=dict(static=True))

    @property
    def batch_size(self) -> int:
        """Rows: prompts one generate() call can take."""
        return self.block_table.shape[0]

    @property
    def max_length(self) -> int:
        """Tokens one row can hold."""
        return self.block_table.shape[1] * self.block_size

    @property
    def num_slots(self) -> int:
        """Token slots in the pool (num_blocks * block_size)."""
        return self.k[0].shape[1]

    @property
    def num_blocks(self) -> int:
        """KV blocks in the pool, shared by all rows."""
        return self.num_slots // self.block_size

    def nbytes(self) -> int:
        """Bytes of the K/V pools (the cache's memory; block tables and index not counted)."""
        return sum(x.nbytes for x in self.k + self.v)

    def bytes_per_token(self) -> int:
        """KV bytes one token occupies (all cache layer slots, keys and values)."""
        return self.nbytes() // self.num_slots

    def rows(self, slots: jax.Array):
        """The cache seen by rows `slots` [B]: the same pools, those rows' block tables and lengths.
        Ids past the last row are padding: they read as empty rows (block 0, length 0)."""
        get = lambda x: x.at[slots].get(mode="fill", fill_value=0)
        return dataclasses.replace(self, block_table=get(self.block_table), lengths=get(self.lengths))

    def token_slots(self) -> jax.Array:
        """[batch, max_length] pool slot of every position of every row."""
        offsets = jnp.arange(self.block_size, dtype=jnp.int32)
        slots = self.block_table[:, :, None] * self.block_size + offsets
        return slots.reshape(self.batch_size, -1)

    def write_slots(self, q_pos: jax.Array, valid: jax.Array) -> jax.Array:
        """[B, T] pool slot of each token of a chunk at positions `q_pos` [B, T]; tokens not
        `valid` (padding) or past a row's end get num_slots, so their writes are dropped."""
        in_range = valid & (q_pos < self.max_length)
        slots = jnp.take_along_axis(self.token_slots(), jnp.minimum(q_pos, self.max_length - 1), 1)
        return jnp.where(in_range, slots, self.num_slots)

    def layer_states(self) -> list[LayerKV]:
        """The (k, v) pools of every cache layer slot, to thread through the layers."""
        return list(zip(self.k, self.v))
