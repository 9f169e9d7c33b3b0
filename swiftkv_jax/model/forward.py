"""The (SwiftKV) Llama forward pass over a params pytree and a KV-cache pytree.

One code path for both models (README, "Architecture"):
  tokens -> embed -> layers [0, L) -> s = norm_swiftkv(h_L) -> K/V of all upper groups -> cache
  then, only for the tokens whose logits are wanted: layers [L, N) -> norm -> lm_head.
With L = N (SwiftKV off) the upper segment is empty and this is a plain Llama. The cache's layer
slots are threaded through the layers and come back in the returned cache (layers.py,
swiftkv_layers.py); nothing is mutated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from ..config import ModelConfig
from . import int8
from .attention import F32
from .int8 import Int8Weight
from .kv_access import ChunkKV, PackedKV, PagedView
from .layers import embed, rms_norm, run_layers
from .paged_cache import PagedCache
from .params import Params, Weights, empty_weights, set_path, tensors
from .swiftkv_layers import last_token, run_upper, upper_layers, write_upper_kv


def logits_from_hidden(params: Params, h: jax.Array) -> jax.Array:
    """Final norm and LM head, float32 logits."""
    w = params.weights
    h = final_norm(params, h)
    head = w["embed_tokens"] if params.config.tie_word_embeddings else w["lm_head"]
    if isinstance(head, Int8Weight):  # stored [V, D] either way
        return int8.matmul(h, head, F32)
    if params.config.tie_word_embeddings:  # contract with [V, D] as stored: no transposed copy
        return jnp.einsum("...d,vd->...v", h, w["embed_tokens"].astype(h.dtype),
                          preferred_element_type=F32)
    return jnp.einsum("...d,dv->...v", h, w["lm_head"].astype(h.dtype), preferred_element_type=F32)


# Any paged cache record (the runtime's KVCache adds its prefix index); forward returns the same type.
Cache = TypeVar("Cache", bound=PagedCache)


def forward(params: Params, cache: Cache | None, tokens: jax.Array,
            num_new: jax.Array | None = None, *, all_logits: bool = False
            ) -> tuple[jax.Array, Cache | None]:
    """Runs `tokens` [B, T] appended to each row of `cache` (or alone when `cache` is None).

    `num_new` [B] counts the real tokens of each row (the rest is padding; default T). Returns
    the logits of every token [B, T, V] if `all_logits`, else of each row's last real token
    [B, V], and the cache with the new tokens' K/V written and lengths advanced.
    For SwiftKV models and `all_logits=False`, layers [L, N) run on the last token only.
    """
    cfg, w = params.config, params.weights
    L, b, t = cfg.num_key_value_layers, *tokens.shape
    num_new = jnp.full((b,), t, jnp.int32) if num_new is None else num_new.astype(jnp.int32)
    if cache is not None:
        if all_logits:
            raise ValueError("all_logits=True runs without a cache (cache=None): with one, only "
                             "each row's last logits are computed")
        return forward_packed(params, cache, [(jnp.arange(b, dtype=jnp.int32), tokens, num_new)])
    q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    kv, states = ChunkKV(q_pos), [None] * cfg.num_cache_layers
    h, _, _ = run_layers(w["layers"][:L], cfg, embed(w, tokens), q_pos, kv, states[:L])
    if cfg.swiftkv:  # SwiftKV prefill: only the last token goes higher
        h, _, _ = upper_layers(w, cfg, h, q_pos, kv, states[L:], None if all_logits else num_new)
        num_new = num_new if all_logits else jnp.ones_like(num_new)
    if not all_logits:
        h = last_token(h, num_new)[:, 0]
    return logits_from_hidden(params, h), None


# One batch of cache rows in a packed pass: (slots [B], tokens [B, T], num_new [B]).
Segment = tuple[jax.Array, jax.Array, jax.Array]


def forward_packed(params: Params, cache: Cache, segments: list[Segment]
                   ) -> tuple[jax.Array, Cache]:
    """Several batches of cache rows in one pass: segment (slots, tokens [B, T], num_new [B])
    appends `tokens` (the first num_new[b] real) to rows `slots` (distinct across segments; ids
    past the last row are padding). All tokens lie on one axis, so each weight is read once and
    every matmul sees them all; attention runs per segment. This is the engine's mixed step: a
    prefill chunk and one decode token for every running row (vLLM / Sarathi-Serve).

    Returns the logits of each row's last real token [sum of B, V], segments in order, and the
    cache with the K/V written and the rows' lengths advanced. For SwiftKV models layers [L, N)
    run on those last tokens only: P + R rows of one token each.
    """
    cfg, w = params.config, params.weights
    L = cfg.num_key_value_layers
    rows = [cache.rows(slots) for slots, _, _ in segments]
    q_pos, write, last, start = [], [], [], 0
    for (_, tokens, num_new), view in zip(segments, rows):
        b, t = tokens.shape
        offsets = jnp.arange(t, dtype=jnp.int32)
        pos = view.lengths[:, None] + offsets
        q_pos.append(pos.reshape(-1))
        write.append(view.write_slots(pos, offsets < num_new[:, None]).reshape(-1))
        last.append(start + jnp.arange(b, dtype=jnp.int32) * t + jnp.maximum(num_new - 1, 0))
        start += b * t
    flat = lambda xs: jnp.concatenate(xs)[None]
    tokens, q_pos, last = flat([s[1].reshape(-1) for s in segments]), flat(q_pos), jnp.concatenate(last)
    kv = PackedKV(flat(write), tuple(v.block_table for v in rows),
                  tuple(s[1].shape for s in segments), cache.block_size)
    states = cache.layer_states()
    h_l, lower, _ = run_layers(w["layers"][:L], cfg, embed(w, tokens), q_pos, kv, states[:L])
    h, q_last = h_l[0, last][:, None], q_pos[0, last][:, None]  # [M, 1, D]: each row's last token
    upper: list = []
    if cfg.swiftkv:  # every token's group K/V from h_L; the layers for the M last tokens only
        upper = write_upper_kv(w, cfg, h_l, q_pos, kv, states[L:])
        table = jnp.concatenate([v.block_table for v in rows])
        views = [PagedView(k, v, table, cache.block_size) for k, v in upper]
        h, _ = run_upper(w, cfg, h, q_last, views)
    lengths = cache.lengths
    for (slots, _, num_new), view in zip(segments, rows):
        lengths = lengths.at[slots].set(jnp.minimum(view.lengths + num_new, cache.max_length), mode="drop")
    pools = lower + upper
    return logits_from_hidden(params, h[:, 0]), dataclasses.replace(
        cache, k=[k for k, _ in pools], v=[v for _, v in pools], lengths=lengths)


def _positions(tokens: jax.Array) -> jax.Array:
    b, t = tokens.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def lower_hidden(params: Params, tokens: jax.Array) -> jax.Array:
    """h_L [B, T, D]: the whole sequences through layers [0, L), no cache. Teacher and student share
    this part (distillation computes it once)."""
    cfg, w = params.config, params.weights
    q_pos = _positions(tokens)
    L = cfg.num_key_value_layers
    h, _, _ = run_layers(w["layers"][:L], cfg, embed(w, tokens), q_pos, ChunkKV(q_pos),
                         [None] * L)
    return h


def upper_hidden(params: Params, h_l: jax.Array, *, use_swiftkv: bool = True
                 ) -> tuple[jax.Array, jax.Array]:
    """From h_L through layers [L, N) for every token, no cache: (the hidden state leaving the last
    layer [B, T, D], before the final norm; the hidden state entering the last layer [B, T, D]).
    `use_swiftkv=False` runs the base model's own q/k/v_proj there (the distillation teacher; see
    swiftkv_off for which checkpoints have them)."""
    cfg, w = params.config, params.weights
    q_pos = _positions(h_l[..., 0])
    kv = ChunkKV(q_pos)
    if use_swiftkv and cfg.swiftkv:
        h, _, into_last = upper_layers(w, cfg, h_l, q_pos, kv, [None] * cfg.num_kv_groups)
    else:
        upper = w["layers"][cfg.num_key_value_layers:]
        h, _, into_last = run_layers(upper, cfg, h_l, q_pos, kv, [None] * len(upper))
    return h, into_last


def upper_logits(params: Params, h_l: jax.Array, *, use_swiftkv: bool = True
                 ) -> tuple[jax.Array, jax.Array]:
    """upper_hidden's, with the final norm and LM head applied: (logits [B, T, V], the hidden
    state entering the last layer [B, T, D])."""
    h, into_last = upper_hidden(params, h_l, use_swiftkv=use_swiftkv)
    return logits_from_hidden(params, h), into_last


def final_norm(params: Params, h: jax.Array) -> jax.Array:
    """The model's last RMSNorm (what the LM head reads)."""
    return rms_norm(h, params.weights["norm"]["weight"], params.config.rms_norm_eps)


def head_rows(params: Params) -> jax.Array:
    """The LM head as [V, D] rows (the embedding itself when tied)."""
    w = params.weights
    head = w["embed_tokens"] if params.config.tie_word_embeddings else w["lm_head"].T
    if isinstance(head, Int8Weight):
        raise TypeError("head_rows needs float weights; dequantize int8 params first")
    return head


def init_params(config: ModelConfig, key: jax.Array, dtype: Any = F32) -> Params:
    """Random weights for tests and experiments, by the schema's initialisers (normal std 0.02,
    norms ones); SwiftKV weights then start from the base model's by to_swiftkv's rules."""
    base_cfg = config.replace(num_key_value_layers=config.num_layers, key_value_group_size=1)
    weights: Weights = empty_weights(base_cfg)
    specs = list(tensors(base_cfg))
    for t, k in zip(specs, jax.random.split(key, len(specs))):
        constant = {"ones": jnp.ones, "zeros": jnp.zeros}.get(t.kind.init)
        value = constant(t.shape, F32) if constant else 0.02 * jax.random.normal(k, t.shape, F32)
        set_path(weights, t.path, value)
    base = Params(weights, base_cfg).astype(dtype)
    if config.swiftkv:
        from .swiftkv import to_swiftkv  # the SwiftKV initialisation rules live there
        return to_swiftkv(base, config.num_key_value_layers, config.key_value_group_size)
    return base
