"""The (SwiftKV) Llama forward pass: Flax modules applied to a params pytree and a KV-cache pytree.

One code path for both models (DESIGN.md, "the data path"):
  tokens -> embed -> layers [0, L) -> s = norm_swiftkv(h_L) -> K/V of all upper groups -> cache
  then, only for the tokens whose logits are wanted: layers [L, N) -> norm -> lm_head.
With L = N (SwiftKV off) the upper segment is empty and this is a plain Llama.
Each segment's layers are stacked and run with `lax.scan`; the cache pool rides in the scan carry
and is updated in place (scatter), never copied per layer.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from .cache import KVCache
from .config import ModelConfig, rope_inverse_frequencies
from .params import Params

F32 = jnp.float32
# (keys, values, key_positions, updated cache pools) given this layer's new K/V (None for SwiftKV).
KVAccess = Callable[[jax.Array | None, jax.Array | None], tuple[jax.Array, jax.Array, jax.Array, Any]]

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


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """Causal GQA attention: q [B,T,H,h] over k/v [B,S,K,h]; a query sees keys at positions <= its own."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=F32) * d**-0.5
    mask = k_pos[:, None, :] <= q_pos[:, :, None]
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(F32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


class DecoderLayer(nn.Module):
    """A Llama decoder layer. With `swiftkv=True` its queries use q_proj_swiftkv and its keys and
    values are supplied by the caller (computed from layer L's input), not projected here."""

    config: ModelConfig
    swiftkv: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, q_pos: jax.Array, sin_cos: tuple[jax.Array, jax.Array],
                 kv: KVAccess) -> tuple[jax.Array, Any]:
        cfg = self.config
        d, heads, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        proj = lambda name, shape, x: jnp.einsum(
            "btd,dnh->btnh", x, self.param(name, _init, shape).astype(x.dtype))
        x = RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(h)
        q = apply_rope(proj("q_proj_swiftkv" if self.swiftkv else "q_proj", (d, heads, hd), x), sin_cos)
        if self.swiftkv:
            keys, values, k_pos, pools = kv(None, None)
        else:
            k = apply_rope(proj("k_proj", (d, kvh, hd), x), sin_cos)
            keys, values, k_pos, pools = kv(k, proj("v_proj", (d, kvh, hd), x))
        out = attend(q, keys, values, q_pos, k_pos)
        h = h + jnp.einsum("btnh,nhd->btd", out, self.param("o_proj", _init, (heads, hd, d)).astype(h.dtype))
        h = h + MLP(cfg, name="mlp")(RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(h))
        return h, pools


def _cache_access(pools: tuple[jax.Array, jax.Array], slot: jax.Array, write_slots: jax.Array,
                  read_slots: jax.Array, k_pos: jax.Array) -> KVAccess:
    """KV access through the paged cache: write new K/V into cache layer `slot`, then read the row."""

    def access(k, v):
        k_all, v_all = pools
        if k is not None:  # out-of-range slots (padding tokens) are dropped
            k_all = k_all.at[slot, write_slots].set(k, mode="drop")
            v_all = v_all.at[slot, write_slots].set(v, mode="drop")
        return k_all[slot, read_slots], v_all[slot, read_slots], k_pos, (k_all, v_all)

    return access


def _chunk_access(kv_pos: jax.Array, shared: tuple[jax.Array, jax.Array] | None = None) -> KVAccess:
    """KV access without a cache: attend within the chunk (full-sequence forward, training)."""

    def access(k, v):
        if k is None:
            k, v = shared
        return k, v, kv_pos, None

    return access


def _run_segment(config: ModelConfig, layers: dict, h: jax.Array, q_pos: jax.Array,
                 make_access: Callable[[jax.Array, Any], KVAccess], first_slot: int,
                 slot_stride: int, pools: Any, swiftkv: bool) -> tuple[jax.Array, Any]:
    """Scans stacked `layers` over h; layer i uses cache slot first_slot + i // slot_stride."""
    layer = DecoderLayer(config, swiftkv=swiftkv)
    sin_cos = rope_angles(config, q_pos)

    def body(carry, xs):
        h, pools = carry
        layer_params, i = xs
        slot = first_slot + i // slot_stride
        h, pools = layer.apply({"params": layer_params}, h, q_pos, sin_cos, make_access(slot, pools))
        return (h, pools), None

    n = jax.tree.leaves(layers)[0].shape[0]
    (h, pools), _ = jax.lax.scan(body, (h, pools), (layers, jnp.arange(n)))
    return h, pools


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
    head = w["embed_tokens"].T if params.config.tie_word_embeddings else w["lm_head"]
    return jnp.einsum("...d,dv->...v", h, head.astype(h.dtype), preferred_element_type=F32)


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
    b, t = tokens.shape
    num_new = jnp.full((b,), t, jnp.int32) if num_new is None else num_new.astype(jnp.int32)
    offsets = jnp.arange(t, dtype=jnp.int32)
    h = w["embed_tokens"][tokens]
    if cache is None:
        q_pos = jnp.broadcast_to(offsets, (b, t))
        pools = None
        make_access = lambda slot, pools: _chunk_access(q_pos)
    else:
        q_pos = cache.lengths[:, None] + offsets
        read_slots = cache.token_slots()
        k_pos = jnp.broadcast_to(jnp.arange(read_slots.shape[1], dtype=jnp.int32), read_slots.shape)
        valid = (offsets < num_new[:, None]) & (q_pos < cache.max_length)
        pad_slot = cache.k.shape[1]  # out of range: writes of padding tokens are dropped
        write_slots = jnp.where(valid, jnp.take_along_axis(
            read_slots, jnp.minimum(q_pos, cache.max_length - 1), axis=1), pad_slot)
        pools = (cache.k, cache.v)
        make_access = lambda slot, pools: _cache_access(pools, slot, write_slots, read_slots, k_pos)

    L = cfg.num_key_value_layers
    h, pools = _run_segment(cfg, w["lower"], h, q_pos, make_access, 0, 1, pools, swiftkv=False)

    if cfg.swiftkv:
        group_k, group_v = _swiftkv_kv(params, h, rope_angles(cfg, q_pos))
        if cache is None:
            upper_access = lambda slot, pools: _chunk_access(q_pos, (group_k[slot - L], group_v[slot - L]))
        else:
            groups = L + jnp.arange(cfg.num_kv_groups)
            k_all = pools[0].at[groups[:, None, None], write_slots[None]].set(group_k, mode="drop")
            v_all = pools[1].at[groups[:, None, None], write_slots[None]].set(group_v, mode="drop")
            pools = (k_all, v_all)
            upper_access = make_access
        upper_h, upper_pos = h, q_pos
        if not all_logits:  # SwiftKV prefill: only the last token of each row goes higher.
            upper_h, upper_pos = _last_token(h, num_new), _last_token(q_pos, num_new)
        h, pools = _run_segment(cfg, w["upper"], upper_h, upper_pos, upper_access, L,
                                cfg.key_value_group_size, pools, swiftkv=True)
        if not all_logits:
            h = h[:, 0]
    if not all_logits and h.ndim == 3:
        h = _last_token(h, num_new)[:, 0]
    logits = logits_from_hidden(params, h)
    if cache is not None:
        cache = KVCache(k=pools[0], v=pools[1], block_table=cache.block_table,
                        lengths=jnp.minimum(cache.lengths + num_new, cache.max_length),
                        block_size=cache.block_size)
    return logits, cache


def init_params(config: ModelConfig, key: jax.Array, dtype: Any = F32) -> Params:
    """Random weights (normal, std 0.02; norms ones) for tests and experiments."""
    n = config.num_layers
    L = config.num_key_value_layers
    h0 = jnp.zeros((1, 1, config.hidden_size), dtype)
    pos = jnp.zeros((1, 1), jnp.int32)
    access = _chunk_access(pos)
    k_embed, k_head, k_layers, k_swift = jax.random.split(key, 4)

    def init_layer(k):
        return DecoderLayer(config).init(k, h0, pos, rope_angles(config, pos), access)["params"]

    layers = jax.vmap(init_layer)(jax.random.split(k_layers, n))
    weights: dict[str, Any] = {
        "embed_tokens": _init(k_embed, (config.vocab_size, config.hidden_size), dtype),
        "lower": layers,
        "norm": {"weight": jnp.ones((config.hidden_size,), dtype)},
    }
    if not config.tie_word_embeddings:
        weights["lm_head"] = _init(k_head, (config.hidden_size, config.vocab_size), dtype)
    base = Params(jax.tree.map(lambda x: x.astype(dtype), weights), config.replace(num_key_value_layers=n))
    if config.swiftkv:
        from .swiftkv import to_swiftkv  # the SwiftKV initialisation rules live there
        return to_swiftkv(base, L, config.key_value_group_size)
    return base
