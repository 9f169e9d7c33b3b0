"""The (SwiftKV) Llama forward pass over a params pytree and a KV-cache pytree.

One code path for both models (README, "Architecture"):
  tokens -> embed -> layers [0, L) -> s = norm_swiftkv(h_L) -> K/V of all upper groups -> cache
  then, only for the tokens whose logits are wanted: layers [L, N) -> norm -> lm_head.
With L = N (SwiftKV off) the upper segment is empty and this is a plain Llama. The cache's layer
slots are threaded through the layers and come back in the returned cache (layers.py,
swiftkv_layers.py); nothing is mutated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .attention import F32
from .cache import KVCache
from .config import ModelConfig
from .kv_access import ChunkKV
from .layers import rms_norm, run_layers
from .params import Params, Weights, empty_weights, set_path, tensors
from .swiftkv_layers import last_token, upper_layers


def logits_from_hidden(params: Params, h: jax.Array) -> jax.Array:
    """Final norm and LM head, float32 logits."""
    w = params.weights
    h = rms_norm(h, w["norm"]["weight"], params.config.rms_norm_eps)
    if params.config.tie_word_embeddings:  # contract with [V, D] as stored: no transposed copy
        return jnp.einsum("...d,vd->...v", h, w["embed_tokens"].astype(h.dtype),
                          preferred_element_type=F32)
    return jnp.einsum("...d,dv->...v", h, w["lm_head"].astype(h.dtype), preferred_element_type=F32)


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
    if cache is None:
        q_pos = jnp.broadcast_to(offsets, (b, t))
        kv, states = ChunkKV(q_pos), [None] * cfg.num_cache_layers
    else:
        q_pos = cache.lengths[:, None] + offsets
        kv, states = cache.placement(q_pos, offsets < num_new[:, None]), cache.layer_states()

    h, lower, _ = run_layers(w["layers"][:L], cfg, w["embed_tokens"][tokens], q_pos, kv, states[:L])
    upper: list = []
    carried = num_new  # real tokens per row still carried in h
    if cfg.swiftkv:
        last_only = None if all_logits else num_new  # SwiftKV prefill: only the last token goes higher
        h, upper, _ = upper_layers(w, cfg, h, q_pos, kv, states[L:], last_only)
        carried = carried if all_logits else jnp.ones_like(num_new)
    if not all_logits:
        h = last_token(h, carried)[:, 0]
    new_cache = None if cache is None else cache.advanced(lower + upper, num_new)
    return logits_from_hidden(params, h), new_cache


def _positions(tokens: jax.Array) -> jax.Array:
    b, t = tokens.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def lower_hidden(params: Params, tokens: jax.Array) -> jax.Array:
    """h_L [B, T, D]: the whole sequences through layers [0, L), no cache. Teacher and student share
    this part (distillation computes it once)."""
    cfg, w = params.config, params.weights
    q_pos = _positions(tokens)
    L = cfg.num_key_value_layers
    h, _, _ = run_layers(w["layers"][:L], cfg, w["embed_tokens"][tokens], q_pos, ChunkKV(q_pos),
                         [None] * L)
    return h


def upper_logits(params: Params, h_l: jax.Array, *, use_swiftkv: bool = True
                 ) -> tuple[jax.Array, jax.Array]:
    """From h_L through layers [L, N) for every token, no cache: (logits [B, T, V], the hidden state
    entering the last layer [B, T, D]). `use_swiftkv=False` runs the base model's own q/k/v_proj
    there (the distillation teacher; see swiftkv_off for which checkpoints have them)."""
    cfg, w = params.config, params.weights
    q_pos = _positions(h_l[..., 0])
    kv = ChunkKV(q_pos)
    if use_swiftkv and cfg.swiftkv:
        h, _, into_last = upper_layers(w, cfg, h_l, q_pos, kv, [None] * cfg.num_kv_groups)
    else:
        upper = w["layers"][cfg.num_key_value_layers:]
        h, _, into_last = run_layers(upper, cfg, h_l, q_pos, kv, [None] * len(upper))
    return logits_from_hidden(params, h), into_last


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
