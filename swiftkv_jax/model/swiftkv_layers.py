"""The SwiftKV half of the model (SWIFTKV.md, "The SwiftKV model" and "Inference").

Layers l >= L take their keys and values from one place, `s = norm_swiftkv(h_L)`:
  * `group_kv`: K/V of every AcrossKV group from s, one einsum over the stacked leader weights
    (`K_l = RoPE(s Wk_swift[l*])`, `V_l = s Wv_swift[l*]`), written once into the group's cache slot;
  * `swiftkv_layer`: a layer >= L projects only its queries (`q_proj_swiftkv` on its own
    input_layernorm(h_l)) and attends over its group's K/V; o_proj, MLP and norms are the base's;
  * `upper_layers`: the whole upper segment. With `last_token_only` (prefill), only each row's last
    token goes through it: its K/V already came from h_L, so no other prompt token is needed there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..config import ModelConfig
from . import int8
from .int8 import Int8Weight
from .kv_access import KVView, LayerKV
from .layers import (
    KVPlacement,
    Rope,
    apply_rope,
    attention_input,
    finish_layer,
    queries,
    rms_norm,
    rope_angles,
)
from .params import Weights


def group_kv(w: Weights, config: ModelConfig, h_l: jax.Array, rope: Rope
             ) -> tuple[jax.Array, jax.Array]:
    """K/V [G, B, T, K, h] of every upper group from s = norm_swiftkv(h_L): one einsum each."""
    s = rms_norm(h_l, w["norm"]["weight"], config.rms_norm_eps)
    k, v = (_grouped(s, w[name]) for name in ("k_proj", "v_proj"))
    if "k_bias" in w:  # Qwen2: the SwiftKV projections have biases too, [G, K, h]
        k = k + w["k_bias"][:, None, None].astype(k.dtype)
        v = v + w["v_bias"][:, None, None].astype(v.dtype)
    return jax.vmap(lambda kg: apply_rope(kg, rope))(k), v


def _grouped(s: jax.Array, w: jax.Array | Int8Weight) -> jax.Array:
    """s [B, T, D] through the stacked leaders' weights -> [G, B, T, K, h]."""
    if isinstance(w, Int8Weight):  # values [G, K, h, D]: one matmul, then groups first
        return jnp.moveaxis(int8.matmul(s, w), 2, 0)
    return jnp.einsum("btd,gdkh->gbtkh", s, w.astype(s.dtype))


@functools.partial(jax.jit, static_argnames="config")
def swiftkv_layer(w: Weights, config: ModelConfig, h: jax.Array, q_pos: jax.Array, rope: Rope,
                  kv: KVView) -> jax.Array:
    """A layer >= L: its own SwiftKV queries over its group's keys and values. Jitted, as
    layers.decoder_layer, so the upper layers are traced once."""
    q = queries(w, config, attention_input(w, config, h), rope, "q_proj_swiftkv")
    return finish_layer(w, config, h, q, kv, q_pos)


def last_token(x: jax.Array, num_new: jax.Array) -> jax.Array:
    """x[b, num_new[b] - 1] for each row, keeping a length-1 time axis."""
    idx = jnp.maximum(num_new - 1, 0)
    return jnp.take_along_axis(x, idx.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)


def write_upper_kv(weights: Weights, config: ModelConfig, h_l: jax.Array, q_pos: jax.Array,
                   kv: KVPlacement, states: list[LayerKV | None]) -> list[LayerKV]:
    """The G group cache slots with every token's group K/V (from h_L [B, T, D]) written."""
    k, v = group_kv(weights["swiftkv"], config, h_l, rope_angles(config, q_pos))
    return [kv.write(state, k[j], v[j]) for j, state in enumerate(states)]


def run_upper(weights: Weights, config: ModelConfig, h: jax.Array, q_pos: jax.Array,
              views: list[KVView]) -> tuple[jax.Array, jax.Array]:
    """Layers [L, N) on h [B, T, D] at q_pos, each over its group's view. Returns (h, the hidden
    state entering the last layer)."""
    L, g = config.num_key_value_layers, config.key_value_group_size
    rope = rope_angles(config, q_pos)
    into_last = h
    for i in range(L, config.num_layers):
        into_last = h
        h = swiftkv_layer(weights["layers"][i], config, h, q_pos, rope, views[(i - L) // g])
    return h, into_last


def upper_layers(weights: Weights, config: ModelConfig, h_l: jax.Array, q_pos: jax.Array,
                 kv: KVPlacement, states: list[LayerKV | None], num_new: jax.Array | None = None
                 ) -> tuple[jax.Array, list[LayerKV], jax.Array]:
    """Layers [L, N) of a SwiftKV model on h_L [B, T, D].

    `states` are the G group cache slots; each gets its group's K/V for all T tokens. With
    `num_new` [B] (prefill), only each row's last real token runs the layers and h comes back
    [B, 1, D]. Returns (h, the new group states, the hidden state entering the last layer).
    """
    states = write_upper_kv(weights, config, h_l, q_pos, kv, states)
    h = h_l
    if num_new is not None:
        h, q_pos = last_token(h_l, num_new), last_token(q_pos, num_new)
    h, into_last = run_upper(weights, config, h, q_pos, [kv.read(state) for state in states])
    return h, states, into_last
