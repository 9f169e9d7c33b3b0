"""Paged attention on NVIDIA GPUs: the Pallas (Triton) kernel JAX ships,
`jax.experimental.pallas.ops.gpu.paged_attention`, over our pools as they are (pallas_paged.py
says how our layout maps onto it)."""

from __future__ import annotations

import jax

from .pallas_paged import MAX_QUERIES, largest_divisor, one_query_per_row

__all__ = ["MAX_QUERIES", "paged_attention", "supported"]


def supported(head_dim: int) -> bool:
    """Shapes the Triton kernel takes: head_dim a power of two >= 16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def paged_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, block_table: jax.Array,
                    q_pos: jax.Array, block_size: int, interpret: bool = False) -> jax.Array:
    """attention.attend_paged's contract (q [B, T, H, h] -> [B, T, H, h]) on the Triton kernel."""
    from jax.experimental.pallas.ops.gpu import paged_attention as pallas_gpu

    per_row = block_table.shape[1]
    per_block = largest_divisor(per_row, 8)

    def kernel(q, k_pages, v_pages, lengths, tables):
        return pallas_gpu.paged_attention(q, k_pages, v_pages, tables, lengths, block_h=16,
                                          pages_per_compute_block=per_block,
                                          k_splits=largest_divisor(per_row // per_block, 16),
                                          interpret=interpret)

    return one_query_per_row(kernel, q, k_pool, v_pool, block_table, q_pos, block_size)


