"""Attention for a chunk of queries over the paged cache on TPUs: our own Pallas (Mosaic) kernel.

JAX ships a TPU kernel for decode over pages (one query a row, head_dim a multiple of 128: tpu.py)
and one for mixed batches (`ragged_paged_attention`) that wants k and v interleaved in one page
array, which our pools [kv_heads, slots, head_dim] are not. This kernel takes our pools as they
are: one program per (row, kv head, tile of query rows) walks the row's block table up to the
tile's last position, several blocks a step (the blocks are picked by the BlockSpecs' index maps
from the scalar-prefetched table, so Pallas' pipeline DMAs them while the previous step computes;
steps past the tile's last position repeat the last block, which the pipeline does not fetch
again). The query rows of a kv head's whole group (GQA) share each block read, so it also serves
decode rows where JAX's kernel cannot (head_dim 64, SmolLM2's).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .pallas_paged import pad_blocks

__all__ = ["BLOCK_Q", "KEYS_PER_STEP", "paged_chunk_attention", "supported"]

BLOCK_Q = 128  # query rows of a program (prefill); fewer rows (decode) are one tile
KEYS_PER_STEP = 128  # keys a step attends: a lane-width of scores
LANES = 128  # m and l are kept lane-replicated, as in JAX's TPU flash attention
NEG_INF = float(jnp.finfo(jnp.float32).min)


def supported(head_dim: int, block_size: int) -> bool:
    """Shapes the kernel is written for: head_dim a power of two from 16 to 128 or a multiple of
    128 (narrower heads fill part of the lanes); a block size that is a power of two from 8 up to a
    step (128 keys) or a multiple of a step."""
    power = lambda n: n & (n - 1) == 0
    return ((power(head_dim) and 16 <= head_dim) or head_dim % LANES == 0) and block_size >= 8 and (
        (power(block_size) and block_size <= KEYS_PER_STEP) or block_size % KEYS_PER_STEP == 0)


def _lanes(x: jax.Array, width: int) -> jax.Array:
    """A lane-replicated [rows, 128] array as [rows, width] (width < 128 or a multiple of it)."""
    return x[:, :width] if width < LANES else jnp.tile(x, (1, width // LANES))


def _kernel(table_ref, last_ref, q_ref, pos_ref, *refs, pages_per_step: int, steps: int):
    """One (row b, kv head, tile i) at key step j: q_ref [rows, d], pos_ref [rows, 1] (-1: padding),
    refs = pages_per_step k blocks [block, d], as many v blocks, o_ref, then the m/l/acc scratch."""
    from jax.experimental import pallas as pl

    k_refs, v_refs = refs[:pages_per_step], refs[pages_per_step:2 * pages_per_step]
    o_ref, m_ref, l_ref, acc_ref = refs[2 * pages_per_step:]
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    keys = pages_per_step * k_refs[0].shape[0]
    d = q_ref.shape[-1]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(j * keys <= last_ref[b, i])  # steps past the tile's last position: nothing to see
    def _step():
        join = lambda rs: rs[0][...] if len(rs) == 1 else jnp.concatenate([r[...] for r in rs], axis=0)
        k, v = join(k_refs), join(v_refs)  # [keys, d]
        s = jax.lax.dot_general(q_ref[...], k, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)  # [rows, keys]
        k_pos = j * keys + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        seen = k_pos <= pos_ref[...]
        s = jnp.where(seen, s, NEG_INF)
        m_prev, l_prev = m_ref[...], l_ref[...]
        m_next = jnp.maximum(m_prev, s.max(axis=1)[:, None])  # [rows, 128]
        p = jnp.where(seen, jnp.exp(s - _lanes(m_next, keys)), 0.0)  # a padding row stays 0
        alpha = jnp.exp(m_prev - m_next)
        l_ref[...] = alpha * l_prev + p.sum(axis=1)[:, None]
        m_ref[...] = m_next
        acc_ref[...] = acc_ref[...] * _lanes(alpha, d) + jax.lax.dot(
            p.astype(v.dtype), v, preferred_element_type=jnp.float32)

    @pl.when(j == steps - 1)
    def _store():
        l = _lanes(l_ref[...], d)
        o_ref[...] = (acc_ref[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_size", "interpret", "block_q"))
def paged_chunk_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, block_table: jax.Array,
                          q_pos: jax.Array, block_size: int, interpret: bool = False,
                          block_q: int = BLOCK_Q) -> jax.Array:
    """attention.attend_paged's contract (q [B, T, H, h] -> [B, T, H, h]; query t of row b sees the
    keys at positions <= q_pos[b, t] of b's blocks; -1 marks a padding query) on the kernel.
    `interpret=True` runs it on a CPU (Pallas' TPU interpreter)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    b, t, h, d = q.shape
    kv_heads = k_pool.shape[0]
    group = h // kv_heads
    # The rows of a kv head: its group's queries, query head g's t-th at row g * t_pad + t, so a
    # tile of block_q rows (t_pad a multiple of it) holds one head's consecutive queries.
    one_tile = group * t <= block_q
    t_pad = t if one_tile else -(-t // block_q) * block_q
    rows = group * t_pad
    tile = rows if one_tile else block_q
    tiles = rows // tile
    qh = (q * d**-0.5).reshape(b, t, kv_heads, group, d)
    qh = jnp.pad(qh, ((0, 0), (0, t_pad - t), (0, 0), (0, 0), (0, 0)))
    qh = qh.transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, rows, d)
    pos = jnp.pad(q_pos.astype(jnp.int32), ((0, 0), (0, t_pad - t)), constant_values=-1)
    pos = jnp.tile(pos, (1, group))  # [B, rows]
    last = pos.reshape(b, tiles, tile).max(axis=-1)  # each tile's last position (-1: all padding)

    pages_per_step = max(1, KEYS_PER_STEP // block_size)
    keys = pages_per_step * block_size
    table = pad_blocks(block_table, pages_per_step).astype(jnp.int32)  # whole steps
    steps = table.shape[1] // pages_per_step

    def page_spec(p: int) -> pl.BlockSpec:
        def index(r, kv, i, j, table_ref, last_ref):
            # no fetch past the last step (lax.div: jnp's // lowers through sign, which Mosaic lowers
            # only knowing the TPU generation)
            step = jnp.minimum(j, jax.lax.div(jnp.maximum(last_ref[r, i], 0), keys))
            return kv, table_ref[r, step * pages_per_step + p], 0, 0
        return pl.BlockSpec((None, None, block_size, d), index)

    rows_spec = pl.BlockSpec((None, None, tile, d), lambda r, kv, i, j, *_: (r, kv, i, 0))
    pages = lambda pool: pool.reshape(kv_heads, -1, block_size, d)
    k_pages, v_pages = pages(k_pool), pages(v_pool)
    out = pl.pallas_call(
        functools.partial(_kernel, pages_per_step=pages_per_step, steps=steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kv_heads, tiles, steps),
            in_specs=[rows_spec, pl.BlockSpec((None, tile, 1), lambda r, kv, i, j, *_: (r, i, 0))]
            + [page_spec(p) for p in range(pages_per_step)] * 2,
            out_specs=rows_spec,
            scratch_shapes=[pltpu.VMEM((tile, LANES), jnp.float32), pltpu.VMEM((tile, LANES), jnp.float32),
                            pltpu.VMEM((tile, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="paged_chunk_attention",
    )(table, last, qh, pos[..., None], *[k_pages] * pages_per_step, *[v_pages] * pages_per_step)
    out = out.reshape(b, kv_heads, group, t_pad, d)[:, :, :, :t]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
