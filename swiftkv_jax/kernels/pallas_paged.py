"""What the Pallas paged-attention kernels JAX ships (gpu.py: Triton, tpu.py: Mosaic) share: our
pool [kv_heads, slots, head_dim] is their pages [kv_heads, pages, page_size, head_dim] by a
reshape (a page is one of our blocks), our block tables are their page tables, and they attend
one query per row up to that row's length, unscaled. So a few queries per row become rows of their
own: query t of row b attends to the first q_pos[b, t] + 1 keys of b's table (causal)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

MAX_QUERIES = 16  # queries per row these kernels take (more: XLA's tiled path, prefill-shaped)

# kernel(q [R, H, h], k_pages, v_pages, lengths [R], tables [R, blocks]) -> [R, H, h]
PagedKernel = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of n that is <= at_most (the kernels' block counts must divide)."""
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def pad_blocks(block_table: jax.Array, multiple: int) -> jax.Array:
    """The table's columns padded with block 0 to a multiple of `multiple` (the kernels step over
    whole groups of blocks; they mask and skip blocks past a row's last position)."""
    padded = -(-block_table.shape[1] // multiple) * multiple
    return jnp.pad(block_table, ((0, 0), (0, padded - block_table.shape[1])))


def one_query_per_row(kernel: PagedKernel, q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                      block_table: jax.Array, q_pos: jax.Array, block_size: int) -> jax.Array:
    """attention.attend_paged's contract (q [B, T, H, h] -> [B, T, H, h]) on such a kernel."""
    b, t, h, d = q.shape
    pages = lambda pool: pool.reshape(pool.shape[0], -1, block_size, d)
    out = kernel((q * d**-0.5).reshape(b * t, h, d), pages(k_pool), pages(v_pool),
                 (q_pos.reshape(b * t) + 1).astype(jnp.int32), jnp.repeat(block_table, t, axis=0))
    return out.reshape(b, t, h, d).astype(q.dtype)
