"""Causal GQA attention over keys laid out as the KV cache stores them ([kv_heads, B, S, h]).

Short chunks (decode) take one dense product; long ones (prefill) a flash-style loop over key
tiles with an online softmax that skips the tiles above the diagonal. Pure functions of arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

F32 = jnp.float32
NEG_INF = float(jnp.finfo(F32).min)  # masked scores; finite so fully masked rows stay NaN-free

ATTENTION_TILE = 256  # query/key tile of the prefill attention; scores of a tile stay in cache


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


def _attend_tiled(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                  tile: int = ATTENTION_TILE) -> jax.Array:
    """Flash-style attention: for each query tile, a loop over the key tiles up to its last position
    (keys must be in position order, as cache rows are)."""
    b, t, h, d = q.shape
    kvh = k.shape[0]
    nq, nk = -(-t // tile), -(-k.shape[2] // tile)
    q = _pad_axis(q * d**-0.5, 1, nq * tile)
    q_pos = _pad_axis(q_pos, 1, nq * tile, -1)
    k, v = _pad_axis(k, 2, nk * tile), _pad_axis(v, 2, nk * tile)
    k_pos = _pad_axis(k_pos, 1, nk * tile, jnp.iinfo(jnp.int32).max)
    # [nq, K, B, G * tile, h]: query tile i of each kv head as one matrix.
    q_tiles = jax.vmap(lambda x: _heads_major(x, kvh))(
        q.reshape(b, nq, tile, h, d).transpose(1, 0, 2, 3, 4))
    pos_tiles = q_pos.reshape(b, nq, tile).transpose(1, 0, 2)

    def query_tile(i):
        qt, qp = q_tiles[i], pos_tiles[i]

        def key_tile(carry, j):
            m, l, acc = carry
            kt = jax.lax.dynamic_slice_in_dim(k, j * tile, tile, axis=2)
            vt = jax.lax.dynamic_slice_in_dim(v, j * tile, tile, axis=2)
            kp = jax.lax.dynamic_slice_in_dim(k_pos, j * tile, tile, axis=1)
            s = jnp.einsum("kbqd,kbsd->kbqs", qt, kt, preferred_element_type=F32)
            s = jnp.where(_causal_mask(qp, kp, h // kvh), s, NEG_INF)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            scale = jnp.exp(m - m_new)
            acc = acc * scale[..., None] + jnp.einsum("kbqs,kbsd->kbqd", p.astype(v.dtype), vt,
                                                      preferred_element_type=F32)
            return m_new, l * scale + p.sum(-1), acc

        # Tiles past the diagonal are skipped: lax.cond runs one branch, and unlike a loop with a
        # data-dependent trip count it can be differentiated (distillation trains through this).
        last_tile = jnp.max(qp) // tile + 1
        visit = lambda carry, j: (jax.lax.cond(j < last_tile, key_tile, lambda c, _: c, carry, j), None)
        shape = qt.shape[:-1]
        init = (jnp.full(shape, NEG_INF, F32), jnp.zeros(shape, F32), jnp.zeros(qt.shape, F32))
        (_, l, acc), _ = jax.lax.scan(visit, init, jnp.arange(nk))
        return _from_heads_major((acc / l[..., None]).astype(q.dtype), tile)

    out = jax.lax.map(query_tile, jnp.arange(nq))  # [nq, B, tile, H, h]
    return out.transpose(1, 0, 2, 3, 4).reshape(b, nq * tile, h, d)[:, :t]
