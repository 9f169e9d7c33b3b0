"""Paged attention on NVIDIA GPUs: the Pallas (Triton) kernel JAX ships,
`jax.experimental.pallas.ops.gpu.paged_attention`, over our pools as they are (pallas_paged.py
says how our layout maps onto it)."""

from __future__ import annotations

import jax

from .pallas_paged import MAX_QUERIES, one_query_per_row, pad_blocks

__all__ = ["MAX_QUERIES", "paged_attention", "supported"]

PAGES_PER_COMPUTE_BLOCK = 8  # blocks of the pool one kernel iteration reads (8 x 16 = 128 keys)
MAX_K_SPLITS = 16  # a row's blocks split into up to this many partitions run in parallel


def supported(head_dim: int) -> bool:
    """Shapes the Triton kernel takes: head_dim a power of two >= 16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def paged_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, block_table: jax.Array,
                    q_pos: jax.Array, block_size: int, interpret: bool = False) -> jax.Array:
    """attention.attend_paged's contract (q [B, T, H, h] -> [B, T, H, h]) on the Triton kernel."""
    from jax.experimental.pallas.ops.gpu import paged_attention as pallas_gpu

    # Triton takes power-of-two tensor sizes only, so the table is padded to 8 pages per compute
    # block and a power-of-two number of splits (up to 16) that the blocks divide: 141 blocks a
    # row (2256 tokens) -> 256.
    compute_blocks = -(-block_table.shape[1] // PAGES_PER_COMPUTE_BLOCK)
    k_splits = min(MAX_K_SPLITS, 1 << (compute_blocks - 1).bit_length())
    block_table = pad_blocks(block_table, k_splits * PAGES_PER_COMPUTE_BLOCK)

    def kernel(q, k_pages, v_pages, lengths, tables):
        return pallas_gpu.paged_attention(q, k_pages, v_pages, tables, lengths, block_h=16,
                                          pages_per_compute_block=PAGES_PER_COMPUTE_BLOCK,
                                          k_splits=k_splits, interpret=interpret)

    return one_query_per_row(kernel, q, k_pool, v_pool, block_table, q_pos, block_size)


