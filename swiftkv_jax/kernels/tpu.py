"""Paged attention on TPUs: the Pallas (Mosaic) kernel JAX ships,
`jax.experimental.pallas.ops.tpu.paged_attention`, over our pools as they are (pallas_paged.py
says how our layout maps onto it). Its TPU lowering needs head_dim a multiple of 128
(Llama-3.1-8B's 128); other head dims (SmolLM2's 64) take our own kernel, tpu_prefill.py."""

from __future__ import annotations

import jax

from .pallas_paged import MAX_QUERIES, largest_divisor, one_query_per_row

__all__ = ["MAX_QUERIES", "paged_attention", "supported"]


def supported(head_dim: int) -> bool:
    """Shapes the TPU kernel lowers for: head_dim a multiple of 128."""
    return head_dim % 128 == 0


def paged_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, block_table: jax.Array,
                    q_pos: jax.Array, block_size: int) -> jax.Array:
    """attention.attend_paged's contract (q [B, T, H, h] -> [B, T, H, h]) on the TPU kernel
    (interpret it on a CPU under `pltpu.force_tpu_interpret_mode()`)."""
    from jax.experimental.pallas.ops.tpu import paged_attention as pallas_tpu

    per_block = largest_divisor(block_table.shape[1], 8)

    def kernel(q, k_pages, v_pages, lengths, tables):
        return pallas_tpu.paged_attention(q, k_pages, v_pages, lengths, tables,
                                          pages_per_compute_block=per_block)

    return one_query_per_row(kernel, q, k_pool, v_pool, block_table, q_pos, block_size)
