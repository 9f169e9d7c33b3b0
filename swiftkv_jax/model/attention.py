"""Causal GQA attention over keys laid out as the KV cache stores them (kv-head-major).

`attend` takes the keys as arrays [kv_heads, B, S, h] (no cache: distillation, calibration):
short chunks one dense product, long ones a flash-style loop over key tiles with an online
softmax that skips the tiles above the diagonal. `attend_paged` reads the keys straight from a
paged pool [kv_heads, slots, h], one gathered key tile at a time and only up to the last query
position, so a step costs what its rows hold, not the cache's max_length. Pure functions of arrays.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ..kernels import cpu as cpu_kernels
from ..kernels import gpu as gpu_kernels
from ..kernels import gpu_prefill, tpu_prefill
from ..kernels import tpu as tpu_kernels

F32 = jnp.float32
NEG_INF = float(jnp.finfo(F32).min)  # masked scores; finite so fully masked rows stay NaN-free

ATTENTION_TILE = 256  # query/key tile of the prefill attention; scores of a tile stay in cache
# Key tile of a decode step over the paged cache: smaller tiles measured faster there (SmolLM2-135M,
# 8 rows x 1.1k tokens, 2-core Xeon: 197 -> 168 ms a step from 256 to 64), larger ones in prefill.
DECODE_TILE = 64
MIN_TILED_QUERIES = 16  # chunks of at least this many tokens take the prefill tile


def _heads_major(q: jax.Array, kv_heads: int) -> jax.Array:
    """q [B, T, H, h] -> [K, B, G * T, h]: each kv head's queries as one matrix (GQA)."""
    b, t, h, d = q.shape
    g = h // kv_heads
    return q.reshape(b, t, kv_heads, g, d).transpose(2, 0, 3, 1, 4).reshape(kv_heads, b, g * t, d)


def _from_heads_major(o: jax.Array, t: int) -> jax.Array:
    """Inverse of _heads_major."""
    k, b, gt, d = o.shape
    g = gt // t
    return o.reshape(k, b, g, t, d).transpose(1, 3, 0, 2, 4).reshape(b, t, k * g, d)


def _causal_mask(q_pos: jax.Array, k_pos: jax.Array, g: int) -> jax.Array:
    """[1, B, G * T, S] mask: a query sees the keys at positions <= its own."""
    mask = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    b, t, s = mask.shape
    return jnp.broadcast_to(mask[:, None], (b, g, t, s)).reshape(1, b, g * t, s)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """Causal GQA attention of q [B, T, H, h] over k/v [K, B, S, h] (kv-head-major, as the cache
    stores them); key j of row b sits at position k_pos[b, j]. Returns [B, T, H, h].

    Long chunks (prefill) use key tiles with an online softmax and skip the tiles above the
    diagonal; short ones (decode) one dense product.
    """
    if q.shape[1] >= ATTENTION_TILE:
        return _attend_tiled(q, k, v, q_pos, k_pos)
    t, d, kvh = q.shape[1], q.shape[3], k.shape[0]
    qh = _heads_major(q * d**-0.5, kvh)
    scores = jnp.einsum("kbqd,kbsd->kbqs", qh, k, preferred_element_type=F32)
    scores = jnp.where(_causal_mask(q_pos, k_pos, q.shape[2] // kvh), scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return _from_heads_major(jnp.einsum("kbqs,kbsd->kbqd", probs, v), t)


def _pad_axis(x: jax.Array, axis: int, size: int, value: Any = 0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value) if size != x.shape[axis] else x


OnlineSoftmax = tuple[jax.Array, jax.Array, jax.Array]  # running max, sum, weighted values


def _online_softmax_init(qh: jax.Array) -> OnlineSoftmax:
    shape = qh.shape[:-1]
    return jnp.full(shape, NEG_INF, F32), jnp.zeros(shape, F32), jnp.zeros(qh.shape, F32)


def _online_softmax_step(carry: OnlineSoftmax, qh: jax.Array, kt: jax.Array, vt: jax.Array,
                         mask: jax.Array) -> OnlineSoftmax:
    """One key tile kt/vt [K, B, S, h] of the online softmax for queries qh [K, B, Q, h]."""
    m, l, acc = carry
    s = jnp.einsum("kbqd,kbsd->kbqs", qh, kt, preferred_element_type=F32)
    s = jnp.where(mask, s, NEG_INF)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    scale = jnp.exp(m - m_new)
    acc = acc * scale[..., None] + jnp.einsum("kbqs,kbsd->kbqd", p.astype(vt.dtype), vt,
                                              preferred_element_type=F32)
    return m_new, l * scale + p.sum(-1), acc


def _by_query_tiles(query_tile: Callable[[jax.Array, jax.Array], jax.Array], q: jax.Array,
                    q_pos: jax.Array, tile: int) -> jax.Array:
    """`query_tile(q [B, tile, H, h], q_pos [B, tile]) -> [B, tile, H, h]` over q [B, T, H, h] one
    query tile at a time (lax.map; padded queries sit at position -1), reassembled to [B, T, H, h]."""
    b, t, h, d = q.shape
    nq = -(-t // tile)
    q_tiles = _pad_axis(q, 1, nq * tile).reshape(b, nq, tile, h, d).transpose(1, 0, 2, 3, 4)
    pos_tiles = _pad_axis(q_pos, 1, nq * tile, -1).reshape(b, nq, tile).transpose(1, 0, 2)
    out = jax.lax.map(lambda x: query_tile(*x), (q_tiles, pos_tiles))
    return out.transpose(1, 0, 2, 3, 4).reshape(b, nq * tile, h, d)[:, :t]


def _attend_tiled(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                  tile: int = ATTENTION_TILE) -> jax.Array:
    """Flash-style attention: for each query tile, a loop over the key tiles up to its last position
    (keys must be in position order, as cache rows are)."""
    h, d = q.shape[2:]
    kvh = k.shape[0]
    nk = -(-k.shape[2] // tile)
    k, v = _pad_axis(k, 2, nk * tile), _pad_axis(v, 2, nk * tile)
    k_pos = _pad_axis(k_pos, 1, nk * tile, jnp.iinfo(jnp.int32).max)

    def query_tile(qt: jax.Array, qp: jax.Array) -> jax.Array:
        qh = _heads_major(qt * d**-0.5, kvh)  # each kv head's queries as one matrix

        def key_tile(carry, j):
            kt = jax.lax.dynamic_slice_in_dim(k, j * tile, tile, axis=2)
            vt = jax.lax.dynamic_slice_in_dim(v, j * tile, tile, axis=2)
            kp = jax.lax.dynamic_slice_in_dim(k_pos, j * tile, tile, axis=1)
            return _online_softmax_step(carry, qh, kt, vt, _causal_mask(qp, kp, h // kvh))

        # Tiles past the diagonal are skipped: lax.cond runs one branch, and unlike a loop with a
        # data-dependent trip count it can be differentiated (distillation trains through this).
        last_tile = jnp.max(qp) // tile + 1
        visit = lambda carry, j: (jax.lax.cond(j < last_tile, key_tile, lambda c, _: c, carry, j), None)
        (_, l, acc), _ = jax.lax.scan(visit, _online_softmax_init(qh), jnp.arange(nk))
        return _from_heads_major((acc / l[..., None]).astype(q.dtype), tile)

    return _by_query_tiles(query_tile, q, q_pos, tile)


def attend_paged(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, block_table: jax.Array,
                 block_size: int, q_pos: jax.Array, tile: int | None = None) -> jax.Array:
    """Causal GQA attention of q [B, T, H, h] over the rows of a paged cache: row b's key at
    position p is slot `block_table[b, p // block_size] * block_size + p % block_size` of the
    pools [K, slots, h]. Returns [B, T, H, h].

    A while_loop over key tiles gathers each tile's blocks from the pool and stops after the
    tile holding the last query position, so nothing past what the rows hold is read (gathering
    whole rows first cost a decode step ~40% of its time at 8 rows x 1.1k of 2048 tokens). Not
    differentiable (the trip count is data-dependent); training never runs on a cache. Decode
    steps and short chunks lowered for a CPU run kernels/cpu.py's native kernel instead (float32,
    when it builds), lowered for CUDA the Pallas/Triton kernel of kernels/gpu.py, lowered for a
    TPU the Pallas/Mosaic kernel of kernels/tpu.py (head_dim a multiple of 128; other head dims our
    Mosaic kernel of kernels/tpu_prefill.py). Prefill chunks lowered for CUDA run our Pallas/Triton
    kernel of kernels/gpu_prefill.py, lowered for a TPU our Mosaic kernel of kernels/tpu_prefill.py.
    """
    _, t, _, d = q.shape
    xla = lambda *a: _attend_paged_xla(*a, block_size, tile)
    args = (q, k_pool, v_pool, block_table, q_pos)
    if tile is not None:  # an explicit key tile: XLA's path (tests and benchmarks of it)
        return xla(*args)
    # A kernel per platform, chosen when the program is lowered for one (not when it is traced),
    # so a program exported for a GPU or TPU from a CPU host never carries the CPU's call. XLA's
    # path everywhere else, and as the kernels' reference.
    kernels: dict[str, Callable[..., jax.Array]] = {}
    tpu_chunks = lambda *a: tpu_prefill.paged_chunk_attention(*a, block_size)
    if t >= MIN_TILED_QUERIES:  # prefill chunks
        if gpu_prefill.supported(d, block_size):
            kernels["cuda"] = lambda *a: gpu_prefill.paged_prefill_attention(*a, block_size)
        if tpu_prefill.supported(d, block_size):
            kernels["tpu"] = tpu_chunks
    else:  # decode steps and short chunks
        target = cpu_kernels.paged_attention_target()
        if target is not None and q.dtype == k_pool.dtype == v_pool.dtype == F32:
            kernels["cpu"] = lambda *a: cpu_kernels.paged_attention(target, *a, block_size)
        if gpu_kernels.supported(d) and t <= gpu_kernels.MAX_QUERIES:
            kernels["cuda"] = lambda *a: gpu_kernels.paged_attention(*a, block_size)
        if tpu_kernels.supported(d) and t <= tpu_kernels.MAX_QUERIES:
            kernels["tpu"] = lambda *a: tpu_kernels.paged_attention(*a, block_size)
        elif tpu_prefill.supported(d, block_size):  # JAX's kernel wants head_dim 128k: ours
            kernels["tpu"] = tpu_chunks
    return jax.lax.platform_dependent(*args, default=xla, **kernels) if kernels else xla(*args)


def _attend_paged_xla(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, block_table: jax.Array,
                      q_pos: jax.Array, block_size: int, tile: int | None) -> jax.Array:
    """attend_paged in XLA's own ops (every platform; the reference for the kernels)."""
    b, t, h, d = q.shape
    kvh = k_pool.shape[0]
    tile = tile or (DECODE_TILE if t < MIN_TILED_QUERIES else ATTENTION_TILE)
    per_tile = max(1, tile // block_size)
    tile = per_tile * block_size
    n_tiles = -(-block_table.shape[1] // per_tile)
    table = _pad_axis(block_table, 1, n_tiles * per_tile)  # block 0 past the row: masked by position
    k_blocks, v_blocks = (p.reshape(kvh, -1, block_size, d) for p in (k_pool, v_pool))
    offsets = jnp.arange(tile, dtype=jnp.int32)

    def query_tile(qt: jax.Array, qp: jax.Array) -> jax.Array:
        qh = _heads_major(qt * d**-0.5, kvh)

        def key_tile(j, carry):
            ids = jax.lax.dynamic_slice_in_dim(table, j * per_tile, per_tile, axis=1)
            kt, vt = (blocks[:, ids].reshape(kvh, b, tile, d) for blocks in (k_blocks, v_blocks))
            kp = jnp.broadcast_to(j * tile + offsets, (b, tile))
            return _online_softmax_step(carry, qh, kt, vt, _causal_mask(qp, kp, h // kvh))

        last = jnp.clip(jnp.max(qp) // tile + 1, 1, n_tiles)
        _, l, acc = jax.lax.fori_loop(0, last, key_tile, _online_softmax_init(qh))
        return _from_heads_major((acc / l[..., None]).astype(q.dtype), qt.shape[1])

    if t <= tile:
        return query_tile(q, q_pos)
    return _by_query_tiles(query_tile, q, q_pos, tile)  # each query tile with its own key range


def kernels_in_use(params: Any, platform: str | None = None) -> dict[str, str]:
    """Which attention code a model's programs run on `platform` (default: JAX's default backend),
    in words: decode steps and short chunks over the paged cache, and prefill chunks. The same
    rules attend_paged applies when a program is lowered (notebooks print this)."""
    platform = platform or jax.default_backend()
    cfg = params.config
    d, dtype = cfg.head_dim, params.dtype
    xla = "XLA (the pool's blocks gathered tile by tile)"
    ours_on_tpu = "Pallas/Mosaic paged_chunk_attention (kernels/tpu_prefill.py)"
    if platform == "cpu":
        built = cpu_kernels.paged_attention_target() is not None
        why = (" [the native kernel takes float32 only]" if built else
               " [no native kernel: no C++ compiler, or SWIFTKV_JAX_CPU_KERNELS=off]")
        decode = ("native C++ kernel (kernels/paged_attention.cc, reads the pool in place)"
                  if built and dtype == F32 else xla + why)
    elif platform in ("gpu", "cuda"):
        decode = ("Pallas/Triton paged_attention (jax.experimental.pallas.ops.gpu)"
                  if gpu_kernels.supported(d) else xla + f" [head_dim {d} is not a power of two >= 16]")
    elif platform == "tpu":
        decode = ("Pallas/Mosaic paged_attention (jax.experimental.pallas.ops.tpu)"
                  if tpu_kernels.supported(d) else ours_on_tpu if tpu_prefill.supported(d, 16)
                  else xla + f" [head_dim {d}: no TPU kernel]")
    else:
        decode = xla
    prefill = f"XLA, {ATTENTION_TILE}-token key tiles with an online softmax"
    if platform in ("gpu", "cuda"):
        prefill = ("Pallas/Triton paged_prefill_attention (kernels/gpu_prefill.py; cache blocks a power "
                   "of two <= 64)" if gpu_prefill.supported(d, 16) else prefill + f" [head_dim {d} is not a "
                   "power of two >= 16]")
    elif platform == "tpu":
        prefill = ours_on_tpu if tpu_prefill.supported(d, 16) else prefill + f" [head_dim {d}: no TPU kernel]"
    return {"platform": platform, "decode": decode, "prefill chunks": prefill}
