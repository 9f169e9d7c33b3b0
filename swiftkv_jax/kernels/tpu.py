"""Paged attention on TPUs: the Pallas (Mosaic) kernel JAX ships,
`jax.experimental.pallas.ops.tpu.paged_attention`, over our pools as they are.

The kernel's pages [kv_heads, pages, page_size, head_dim] are our pool by a reshape (a page is
one of our blocks) and its page indices are our block tables. It attends one query per row up to
that row's length, so a few queries per row become rows of their own (query t of row b attends to
the first q_pos[b, t] + 1 keys: causal). Its TPU lowering needs head_dim a multiple of 128
(Llama-3.1-8B's 128; SmolLM2's 64 would need the pools stored padded to 128, so XLA's path serves
it). It does not scale q; we do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_QUERIES = 16  # queries per row this path takes (more: XLA's tiled path, prefill-shaped)


def supported(head_dim: int) -> bool:
    """Shapes the TPU kernel lowers for: head_dim a multiple of 128."""
    return head_dim % 128 == 0


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def paged_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, block_table: jax.Array,
                    q_pos: jax.Array, block_size: int) -> jax.Array:
    """attention.attend_paged's contract (q [B, T, H, h] -> [B, T, H, h]) on the TPU kernel
    (interpret it on a CPU under `pltpu.force_tpu_interpret_mode()`)."""
    from jax.experimental.pallas.ops.tpu import paged_attention as pallas_tpu

    b, t, h, d = q.shape
    pages = lambda pool: pool.reshape(pool.shape[0], -1, block_size, d)
    out = pallas_tpu.paged_attention(
        (q * d**-0.5).reshape(b * t, h, d), pages(k_pool), pages(v_pool),
        (q_pos.reshape(b * t) + 1).astype(jnp.int32), jnp.repeat(block_table, t, axis=0),
        pages_per_compute_block=_largest_divisor(block_table.shape[1], 8))
    return out.reshape(b, t, h, d).astype(q.dtype)
