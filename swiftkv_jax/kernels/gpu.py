"""Paged attention on NVIDIA GPUs: the Pallas (Triton) kernel JAX ships,
`jax.experimental.pallas.ops.gpu.paged_attention`, over our pools as they are.

Our pool [kv_heads, slots, head_dim] is the kernel's `k_pages` [kv_heads, pages, page_size,
head_dim] by a reshape (a page is one of our blocks), and our block tables are its block tables.
The kernel attends one query per row up to that row's length, so a few queries per row (a decode
step, or a short chunk) become rows of their own: query t of row b attends to the first
q_pos[b, t] + 1 keys of b's table, which is causal attention. It does not scale q; we do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MAX_QUERIES = 16  # queries per row this path takes (more: XLA's tiled path, prefill-shaped)


def supported(head_dim: int, heads_per_kv_head: int) -> bool:
    """Shapes the Triton kernel takes: head_dim a power of two >= 16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and heads_per_kv_head >= 1


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def paged_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, block_table: jax.Array,
                    q_pos: jax.Array, block_size: int, interpret: bool = False) -> jax.Array:
    """attention.attend_paged's contract (q [B, T, H, h] -> [B, T, H, h]) on the Triton kernel."""
    from jax.experimental.pallas.ops.gpu import paged_attention as pallas_gpu

    b, t, h, d = q.shape
    kv_heads = k_pool.shape[0]
    pages = functools.partial(jnp.reshape, shape=(kv_heads, -1, block_size, d))
    per_row = block_table.shape[1]
    per_block = _largest_divisor(per_row, 8)
    out = pallas_gpu.paged_attention(
        (q * d**-0.5).reshape(b * t, h, d), pages(k_pool), pages(v_pool),
        jnp.repeat(block_table, t, axis=0), (q_pos.reshape(b * t) + 1).astype(jnp.int32),
        block_h=16, pages_per_compute_block=per_block,
        k_splits=_largest_divisor(per_row // per_block, 16), interpret=interpret)
    return out.reshape(b, t, h, d).astype(q.dtype)
