"""The (SwiftKV) Llama forward pass: Flax modules applied to a params pytree and a KV-cache pytree.

One code path for both models (DESIGN.md, "the data path"):
  tokens -> embed -> layers [0, L) -> s = norm_swiftkv(h_L) -> K/V of all upper groups -> cache
  then, only for the tokens whose logits are wanted: layers [L, N) -> norm -> lm_head.
With L = N (SwiftKV off) the upper segment is empty and this is a plain Llama.
Layers are a list of per-layer weight trees run by an unrolled Python loop: on CPU this measured
faster than `lax.scan` over stacked weights (whose per-layer slices XLA copies), e.g. SmolLM2-135M
decode 21 -> 29 tokens/s. Each layer writes its new K/V into its own cache pool, then reads its rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from .cache import KVCache
from .config import ModelConfig, rope_inverse_frequencies
from .params import Params

F32 = jnp.float32
NEG_INF = float(jnp.finfo(F32).min)  # masked scores; finite so fully masked rows stay NaN-free
# Given a layer's new (K, V) [B, T, K, h] (None for a SwiftKV layer): the keys and values
# [K, B, S, h] and key positions [B, S] it attends over.
KVAccess = Callable[[tuple[jax.Array, jax.Array] | None], tuple[jax.Array, jax.Array, jax.Array]]

_init = nn.initializers.normal(0.02)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the activation dtype."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(F32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * w.astype(F32)).astype(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, f = self.config.hidden_size, self.config.intermediate_size
        gate = x @ self.param("gate_proj", _init, (d, f)).astype(x.dtype)
        up = x @ self.param("up_proj", _init, (d, f)).astype(x.dtype)
        return (jax.nn.silu(gate) * up) @ self.param("down_proj", _init, (f, d)).astype(x.dtype)


def rope_angles(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) of shape [..., head_dim / 2] for integer `positions`, in float32."""
    inv = jnp.asarray(rope_inverse_frequencies(config), F32)
    angles = positions.astype(F32)[..., None] * inv
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin_cos: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Half-split rotary embedding (Hugging Face layout) on x [B, T, heads, head_dim]."""
    sin, cos = (a[:, :, None, :] for a in sin_cos)
    x1, x2 = jnp.split(x.astype(F32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


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


def _project(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [B, T, D] @ w [D, heads, h] -> [B, T, heads, h], as one plain matmul."""
    return (x @ w.reshape(w.shape[0], -1).astype(x.dtype)).reshape(x.shape[:2] + w.shape[1:])


class DecoderLayer(nn.Module):
    """A Llama decoder layer. With `swiftkv=True` its queries use q_proj_swiftkv and its keys and
    values come from the cache slot its SwiftKV group wrote (from layer L's input), not projected
    here. `kv` stores this layer's new K/V [B, T, K, h] (None for a SwiftKV layer) and returns
    the keys, values [K, B, S, h] and key positions [B, S] to attend over."""

    config: ModelConfig
    swiftkv: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, q_pos: jax.Array, sin_cos: tuple[jax.Array, jax.Array],
                 kv: KVAccess) -> jax.Array:
        cfg = self.config
        d, heads, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        weight = lambda name, shape: self.param(name, _init, shape)
        x = RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(h)
        q_name = "q_proj_swiftkv" if self.swiftkv else "q_proj"
        q = apply_rope(_project(x, weight(q_name, (d, heads, hd))), sin_cos)
        new_kv = None
        if not self.swiftkv:
            new_kv = (apply_rope(_project(x, weight("k_proj", (d, kvh, hd))), sin_cos),
                      _project(x, weight("v_proj", (d, kvh, hd))))
        keys, values, k_pos = kv(new_kv)
        out = attend(q, keys, values, q_pos, k_pos)
        o_proj = weight("o_proj", (heads, hd, d)).reshape(heads * hd, d).astype(h.dtype)
        h = h + out.reshape(h.shape[:2] + (heads * hd,)) @ o_proj
        return h + MLP(cfg, name="mlp")(RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(h))


class _KVSource:
    """Where attention finds keys: the chunk alone (no cache), or the cache rows.

    A cache layer slot is written first (scatter of the chunk's new K/V into its pool array), then
    read (gather of each row's slots): XLA does both in place. Reading a pool and writing it later
    in the same program made XLA copy it.
    """

    def __init__(self, cache: KVCache | None, q_pos: jax.Array, valid: jax.Array):
        self.cache, self.q_pos = cache, q_pos
        if cache is not None:
            self.k, self.v = list(cache.k), list(cache.v)
            self.read_slots = cache.token_slots()  # [B, S]
            self.k_pos = jnp.broadcast_to(jnp.arange(self.read_slots.shape[1], dtype=jnp.int32),
                                          self.read_slots.shape)
            in_range = valid & (q_pos < cache.max_length)
            slots = jnp.take_along_axis(self.read_slots, jnp.minimum(q_pos, cache.max_length - 1), 1)
            self.write_slots = jnp.where(in_range, slots, cache.num_slots)  # padding: dropped

    def write(self, slot: int, k: jax.Array, v: jax.Array) -> None:
        """Stores the chunk's K/V [B, T, K, h] in cache layer `slot` (kept for attention if no cache)."""
        if self.cache is None:
            self.k_chunk, self.v_chunk = k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3)
            return
        put = lambda pool, x: pool.at[:, self.write_slots].set(x.transpose(2, 0, 1, 3), mode="drop")
        self.k[slot], self.v[slot] = put(self.k[slot], k), put(self.v[slot], v)

    def read(self, slot: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        if self.cache is None:
            return self.k_chunk, self.v_chunk, self.q_pos
        c = self.cache
        # Gather whole blocks (contiguous block_size x head_dim runs), not single token slots.
        rows = lambda pool: pool.reshape(pool.shape[0], c.num_blocks, c.block_size, -1)[
            :, c.block_table].reshape(pool.shape[0], c.batch_size, c.max_length, -1)
        return rows(self.k[slot]), rows(self.v[slot]), self.k_pos

    def access(self, slot: int, shared: tuple[jax.Array, jax.Array] | None = None) -> KVAccess:
        """The KVAccess of a layer using cache slot `slot`; `shared` is a SwiftKV group's chunk K/V
        (no cache: read directly; with a cache it was written once for the whole group)."""

        def kv(new):
            if new is not None:
                self.write(slot, *new)
            elif self.cache is None:
                self.write(slot, *shared)
            return self.read(slot)

        return kv

    def updated(self, num_new: jax.Array) -> KVCache:
        return dataclasses.replace(self.cache, k=self.k, v=self.v,
                                   lengths=jnp.minimum(self.cache.lengths + num_new, self.cache.max_length))


def _swiftkv_kv(params: Params, h_l: jax.Array, sin_cos: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """K/V [G, B, T, K, h] of every upper group from s = norm_swiftkv(h_L): one einsum each."""
    w = params.weights["swiftkv"]
    s = RMSNorm(params.config.rms_norm_eps).apply({"params": w["norm"]}, h_l)
    k = jnp.einsum("btd,gdkh->gbtkh", s, w["k_proj"].astype(s.dtype))
    v = jnp.einsum("btd,gdkh->gbtkh", s, w["v_proj"].astype(s.dtype))
    sin, cos = sin_cos
    k = jax.vmap(lambda kg: apply_rope(kg, (sin, cos)))(k)
    return k, v


def _last_token(x: jax.Array, num_new: jax.Array) -> jax.Array:
    """x[b, num_new[b] - 1] for each row, keeping a length-1 time axis."""
    idx = jnp.maximum(num_new - 1, 0)
    return jnp.take_along_axis(x, idx.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)


def logits_from_hidden(params: Params, h: jax.Array) -> jax.Array:
    """Final norm and LM head, float32 logits."""
    w = params.weights
    h = RMSNorm(params.config.rms_norm_eps).apply({"params": w["norm"]}, h)
    if params.config.tie_word_embeddings:  # contract with [V, D] as stored: no transposed copy
        return jnp.einsum("...d,vd->...v", h, w["embed_tokens"].astype(h.dtype),
                          preferred_element_type=F32)
    return jnp.einsum("...d,dv->...v", h, w["lm_head"].astype(h.dtype), preferred_element_type=F32)


def _run_layers(params: Params, source: _KVSource, h: jax.Array, q_pos: jax.Array, layers: range,
                groups: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
    """Runs `layers` on h; with `groups` (SwiftKV K/V [G, B, T, K, h]) as SwiftKV layers.

    Returns the output and the hidden state that entered the model's last layer (or h if the last
    layer is not among `layers`), which the distillation loss compares.
    """
    cfg, w = params.config, params.weights
    layer = DecoderLayer(cfg, swiftkv=groups is not None)
    sin_cos = rope_angles(cfg, q_pos)
    into_last = h
    for i in layers:
        if i == cfg.num_layers - 1:
            into_last = h
        if groups is None:
            access = source.access(i)
        else:
            g = (i - cfg.num_key_value_layers) // cfg.key_value_group_size
            access = source.access(cfg.num_key_value_layers + g, (groups[0][g], groups[1][g]))
        h = layer.apply({"params": w["layers"][i]}, h, q_pos, sin_cos, access)
    return h, into_last


def forward(params: Params, cache: KVCache | None, tokens: jax.Array,
            num_new: jax.Array | None = None, *, all_logits: bool = False
            ) -> tuple[jax.Array, KVCache | None]:
    """Runs `tokens` [B, T] appended to each row of `cache` (or alone when `cache` is None).

    `num_new` [B] counts the real tokens of each row (the rest is padding; default T). Returns
    the logits of every token [B, T, V] if `all_logits`, else of each row's last real token
    [B, V], and the cache with the new tokens' K/V written and lengths advanced.
    For SwiftKV models and `all_logits=False`, layers [L, N) run on the last token only.
    """
    cfg, w = params.config, params.weights
    L, b, t = cfg.num_key_value_layers, *tokens.shape
    num_new = jnp.full((b,), t, jnp.int32) if num_new is None else num_new.astype(jnp.int32)
    offsets = jnp.arange(t, dtype=jnp.int32)
    start = jnp.zeros((b,), jnp.int32) if cache is None else cache.lengths
    q_pos = start[:, None] + offsets
    source = _KVSource(cache, q_pos, offsets < num_new[:, None])

    h, _ = _run_layers(params, source, w["embed_tokens"][tokens], q_pos, range(L))
    carried = num_new  # real tokens per row still carried in h
    if cfg.swiftkv:
        groups = _swiftkv_kv(params, h, rope_angles(cfg, q_pos))
        if cache is not None:
            for g in range(cfg.num_kv_groups):
                source.write(L + g, groups[0][g], groups[1][g])
        if not all_logits:  # SwiftKV prefill: only the last token of each row goes higher.
            h, q_pos, carried = _last_token(h, num_new), _last_token(q_pos, num_new), jnp.ones_like(num_new)
        h, _ = _run_layers(params, source, h, q_pos, range(L, cfg.num_layers), groups)
    if not all_logits:
        h = _last_token(h, carried)[:, 0]
    return logits_from_hidden(params, h), (None if cache is None else source.updated(num_new))


def lower_hidden(params: Params, tokens: jax.Array) -> jax.Array:
    """h_L [B, T, D]: the whole sequences through layers [0, L), no cache. Teacher and student share
    this part (distillation computes it once)."""
    b, t = tokens.shape
    q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    source = _KVSource(None, q_pos, q_pos >= 0)
    h, _ = _run_layers(params, source, params.weights["embed_tokens"][tokens], q_pos,
                       range(params.config.num_key_value_layers))
    return h


def upper_logits(params: Params, h_l: jax.Array, *, use_swiftkv: bool = True
                 ) -> tuple[jax.Array, jax.Array]:
    """From h_L through layers [L, N) for every token, no cache: (logits [B, T, V], the hidden state
    entering the last layer [B, T, D]). `use_swiftkv=False` runs the base model's own q/k/v_proj
    there (the distillation teacher; see swiftkv_off for which checkpoints have them)."""
    cfg = params.config
    b, t, _ = h_l.shape
    q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    source = _KVSource(None, q_pos, q_pos >= 0)
    groups = _swiftkv_kv(params, h_l, rope_angles(cfg, q_pos)) if use_swiftkv and cfg.swiftkv else None
    h, into_last = _run_layers(params, source, h_l, q_pos,
                               range(cfg.num_key_value_layers, cfg.num_layers), groups)
    return logits_from_hidden(params, h), into_last


def init_params(config: ModelConfig, key: jax.Array, dtype: Any = F32) -> Params:
    """Random weights (normal, std 0.02; norms ones) for tests and experiments."""
    n = config.num_layers
    h0 = jnp.zeros((1, 1, config.hidden_size), dtype)
    pos = jnp.zeros((1, 1), jnp.int32)
    access = _KVSource(None, pos, pos >= 0).access(0)
    k_embed, k_head, k_layers = jax.random.split(key, 3)
    layers = [DecoderLayer(config).init(k, h0, pos, rope_angles(config, pos), access)["params"]
              for k in jax.random.split(k_layers, n)]
    weights: dict[str, Any] = {
        "embed_tokens": _init(k_embed, (config.vocab_size, config.hidden_size)),
        "layers": layers,
        "norm": {"weight": jnp.ones((config.hidden_size,))},
    }
    if not config.tie_word_embeddings:
        weights["lm_head"] = _init(k_head, (config.hidden_size, config.vocab_size))
    base = Params(weights, config.replace(num_key_value_layers=n, key_value_group_size=1)).astype(dtype)
    if config.swiftkv:
        from .swiftkv import to_swiftkv  # the SwiftKV initialisation rules live there
        return to_swiftkv(base, config.num_key_value_layers, config.key_value_group_size)
    return base
