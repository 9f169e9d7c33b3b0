"""Prefill-chunk attention over the paged cache on NVIDIA GPUs: our own Pallas (Triton) kernel.

JAX ships Pallas GPU kernels for decode over pages (one query a row: gpu.py) and for flash
attention over contiguous keys, but none for a chunk of queries over a row's paged prefix, which is
what every prefill chunk and mixed step runs (XLA's path gathers each key tile's blocks in a
while loop instead). This kernel reads the blocks in place: one program per (row, query head,
tile of BLOCK_Q queries) walks that row's block table up to the tile's last position,
KEYS_PER_STEP keys (whole blocks) a step, with an online softmax and the causal mask by position.
A kv head's blocks are read once per query head of its group (GQA), which prefill's arithmetic hides.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .pallas_paged import pad_blocks

__all__ = ["BLOCK_Q", "paged_prefill_attention", "supported"]

BLOCK_Q = 64  # queries a program attends for (Triton's dot needs >= 16, a power of two)
KEYS_PER_STEP = 64  # keys one loop step reads (whole blocks of the pool)
NEG_INF = float(jnp.finfo(jnp.float32).min)


def supported(head_dim: int, block_size: int) -> bool:
    """Shapes Triton takes: power-of-two head_dim >= 16 and block size (pages per step divide 64)."""
    power = lambda n: n & (n - 1) == 0
    return head_dim >= 16 and power(head_dim) and power(block_size) and block_size <= KEYS_PER_STEP


def _kernel(q_ref, q_pos_ref, k_pages_ref, v_pages_ref, table_ref, o_ref, *, pages_per_step: int):
    """One (row, head, query tile): q_ref [BLOCK_Q, d], q_pos_ref [BLOCK_Q] (-1: padding),
    k/v_pages_ref [pages, block, d] of the head's kv head, table_ref [blocks a row (padded)]."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    block_q, d = q_ref.shape
    block = k_pages_ref.shape[1]
    keys = pages_per_step * block
    q = q_ref[...]
    q_pos = q_pos_ref[...]
    steps = (jnp.max(q_pos) + keys) // keys  # key steps up to the tile's last position

    def step(j, carry):
        acc, m, l = carry
        ids = table_ref[pl.ds(j * pages_per_step, pages_per_step)]
        k = k_pages_ref[ids].reshape(keys, d)
        v = v_pages_ref[ids].reshape(keys, d)
        s = plgpu.dot(q, k.T)  # [BLOCK_Q, keys], float32
        k_pos = j * keys + jnp.arange(keys)
        seen = k_pos[None, :] <= q_pos[:, None]
        s = jnp.where(seen, s, NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(seen, jnp.exp(s - m_new[:, None]), 0.0)  # a padding query's row stays 0
        scale = jnp.exp(m - m_new)
        acc = acc * scale[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, l * scale + p.sum(axis=-1)

    init = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), NEG_INF, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, _, l = jax.lax.fori_loop(0, steps, step, init)
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)  # padding rows: 0


@functools.partial(jax.jit, static_argnames=("block_size", "interpret", "block_q", "keys_per_step"))
def paged_prefill_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, block_table: jax.Array,
                            q_pos: jax.Array, block_size: int, interpret: bool = False,
                            block_q: int = BLOCK_Q, keys_per_step: int = KEYS_PER_STEP) -> jax.Array:
    """attention.attend_paged's contract (q [B, T, H, h] -> [B, T, H, h]; query t of row b sees the
    keys at positions <= q_pos[b, t] of b's blocks; -1 marks a padding query) on the kernel.
    `block_q` / `keys_per_step` (powers of two >= 16) are the tile sizes (device_check times a few)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    b, t, h, d = q.shape
    kv_heads = k_pool.shape[0]
    group = h // kv_heads
    pages_per_step = keys_per_step // block_size
    tiles = -(-t // block_q)
    table = pad_blocks(block_table, pages_per_step)  # whole steps
    per_row = table.shape[1]
    qh = jnp.pad((q * d**-0.5).transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, tiles * block_q - t), (0, 0)))
    pos = jnp.pad(q_pos.astype(jnp.int32), ((0, 0), (0, tiles * block_q - t)), constant_values=-1)
    pages = lambda pool: pool.reshape(kv_heads, -1, block_size, d)
    n_pages = k_pool.shape[1] // block_size
    out = pl.pallas_call(
        functools.partial(_kernel, pages_per_step=pages_per_step),
        grid=(b, h, tiles),
        in_specs=[
            pl.BlockSpec((None, None, block_q, d), lambda r, hd, i: (r, hd, i, 0)),  # q
            pl.BlockSpec((None, block_q), lambda r, hd, i: (r, i)),  # q_pos
            pl.BlockSpec((None, n_pages, block_size, d), lambda r, hd, i: (hd // group, 0, 0, 0)),  # k
            pl.BlockSpec((None, n_pages, block_size, d), lambda r, hd, i: (hd // group, 0, 0, 0)),  # v
            pl.BlockSpec((None, per_row), lambda r, hd, i: (r, 0)),  # the row's block table
        ],
        out_specs=pl.BlockSpec((None, None, block_q, d), lambda r, hd, i: (r, hd, i, 0)),
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="paged_prefill_attention",
    )(qh, pos, pages(k_pool), pages(v_pool), table)
    return out[:, :, :t].transpose(0, 2, 1, 3)
