"""The Llama (and Qwen2 / Qwen3) building blocks as pure functions of a params subtree: norm,
RoPE, MLP, decoder layer.

A decoder layer is `(h, kv_state) -> (h, kv_state)`: it takes its K/V state explicitly (a cache
slot's pools, or nothing without a cache; see kv_access.py) and returns it updated, as Flax's
examples/gemma blocks do. No callbacks, no hidden state, no mode flags: where the K/V live is the
`kv` argument's type. Weights are laid out as params.SCHEMA declares them.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from ..config import ModelConfig, rope_inverse_frequencies
from . import int8
from .attention import F32
from .int8 import Int8Weight
from .kv_access import ChunkKV, KVView, LayerKV, PackedKV
from .params import Weights

KVPlacement = ChunkKV | PackedKV
Rope = tuple[jax.Array, jax.Array]  # (sin, cos) [B, T, head_dim / 2]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Root-mean-square norm, computed in float32 whatever the activation dtype."""
    x32 = x.astype(F32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(F32)).astype(x.dtype)


def rope_angles(config: ModelConfig, positions: jax.Array) -> Rope:
    """(sin, cos) of shape [..., head_dim / 2] for integer `positions`, in float32."""
    inv = jnp.asarray(rope_inverse_frequencies(config), F32)
    angles = positions.astype(F32)[..., None] * inv
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin_cos: Rope) -> jax.Array:
    """Half-split rotary embedding (Hugging Face layout) on x [B, T, heads, head_dim]."""
    sin, cos = (a[:, :, None, :] for a in sin_cos)
    x1, x2 = jnp.split(x.astype(F32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def linear(x: jax.Array, w: jax.Array | Int8Weight, in_dims: int = 1) -> jax.Array:
    """x [..., in] (the weight's `in_dims` input dims flattened) @ a Linear weight -> [..., out...],
    as one plain matmul: a float weight in our layout [in..., out...], or an int8 one."""
    if isinstance(w, Int8Weight):
        return int8.matmul(x, w)
    y = x @ w.reshape(x.shape[-1], -1).astype(x.dtype)
    return y.reshape(x.shape[:-1] + w.shape[in_dims:])


def linears(x: jax.Array, ws: Sequence[jax.Array | Int8Weight]) -> list[jax.Array]:
    """linear(x, w) for each of `ws` (one input); int8 weights as one call (int8.matmuls)."""
    if all(isinstance(w, Int8Weight) for w in ws):
        return int8.matmuls(x, ws)
    return [linear(x, w) for w in ws]


def add_bias(y: jax.Array, bias: jax.Array | None) -> jax.Array:
    """y + bias (Qwen2's q/k/v biases), or y itself without one."""
    return y if bias is None else y + bias.astype(y.dtype)


def embed(w: Weights, tokens: jax.Array) -> jax.Array:
    """The embedding rows of `tokens`, in the activations' dtype (the float weights')."""
    table = w["embed_tokens"]
    if isinstance(table, Int8Weight):
        return int8.lookup(table, tokens, w["norm"]["weight"].dtype)
    return table[tokens]


def project(x: jax.Array, w: jax.Array | Int8Weight, bias: jax.Array | None = None) -> jax.Array:
    """x [B, T, D] @ w [D, heads, h] (+ bias [heads, h], Qwen2) -> [B, T, heads, h]."""
    return add_bias(linear(x, w), bias)


def head_norm(x: jax.Array, norm: Weights | None, config: ModelConfig) -> jax.Array:
    """Qwen3's per-head RMSNorm of q or k [B, T, heads, h] (before RoPE); x itself without one."""
    return x if norm is None else rms_norm(x, norm["weight"], config.rms_norm_eps)


def queries(w: Weights, config: ModelConfig, x: jax.Array, rope: Rope, proj: str = "q_proj") -> jax.Array:
    """The layer's RoPE'd queries [B, T, H, h] from its normed input x, through `proj` (q_proj,
    or q_proj_swiftkv on a SwiftKV layer) and its bias and head norm where the model has them."""
    bias = w.get(proj.replace("proj", "bias"))
    return apply_rope(head_norm(project(x, w[proj], bias), w.get("q_norm"), config), rope)


def mlp(w: Weights, x: jax.Array) -> jax.Array:
    """SwiGLU: down(silu(gate x) * up x)."""
    gate, up = linears(x, [w["gate_proj"], w["up_proj"]])
    return linear(jax.nn.silu(gate) * up, w["down_proj"])


def attention_input(w: Weights, config: ModelConfig, h: jax.Array) -> jax.Array:
    """The layer's normed input x = input_layernorm(h), which its projections read."""
    return rms_norm(h, w["input_layernorm"]["weight"], config.rms_norm_eps)


def own_qkv(w: Weights, config: ModelConfig, x: jax.Array, rope: Rope
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A plain layer's RoPE'd queries [B, T, H, h], RoPE'd keys and values [B, T, K, h] from its own
    input x (the three projections as one call where the weights are int8)."""
    q, k, v = linears(x, [w["q_proj"], w["k_proj"], w["v_proj"]])
    q = apply_rope(head_norm(add_bias(q, w.get("q_bias")), w.get("q_norm"), config), rope)
    k = apply_rope(head_norm(add_bias(k, w.get("k_bias")), w.get("k_norm"), config), rope)
    return q, k, add_bias(v, w.get("v_bias"))


def finish_layer(w: Weights, config: ModelConfig, h: jax.Array, q: jax.Array, kv: KVView,
                 q_pos: jax.Array) -> jax.Array:
    """Attention of q over `kv`, o_proj and the residual, then the MLP block."""
    heads, hd = config.num_heads, config.head_dim
    out = kv.attend(q, q_pos)
    h = h + linear(out.reshape(h.shape[:2] + (heads * hd,)), w["o_proj"], in_dims=2)
    post = rms_norm(h, w["post_attention_layernorm"]["weight"], config.rms_norm_eps)
    return h + mlp(w["mlp"], post)


@functools.partial(jax.jit, static_argnames="config")
def decoder_layer(w: Weights, config: ModelConfig, h: jax.Array, q_pos: jax.Array, rope: Rope,
                  kv: KVPlacement, state: LayerKV | None) -> tuple[jax.Array, LayerKV]:
    """A Llama decoder layer: projects its own q/k/v, writes its K/V into `state` and attends
    over what that holds. Returns (h, the updated state).

    Jitted so that a model's layers, all of one shape, are traced and lowered once instead of
    once per layer (start-up: ~2x less tracing); XLA inlines the call, nothing changes at run time."""
    q, k, v = own_qkv(w, config, attention_input(w, config, h), rope)
    state = kv.write(state, k, v)
    return finish_layer(w, config, h, q, kv.read(state), q_pos), state


def run_layers(params_weights: Sequence[Weights], config: ModelConfig, h: jax.Array,
               q_pos: jax.Array, kv: KVPlacement, states: Sequence[LayerKV | None]
               ) -> tuple[jax.Array, list[LayerKV], jax.Array]:
    """Runs plain decoder layers in order, each with its own state. Returns (h, the new states,
    the hidden state entering the last of these layers).

    An unrolled Python loop: on CPU this measured faster than `lax.scan` over stacked weights
    (whose per-layer slices XLA copies), e.g. SmolLM2-135M decode 21 -> 29 tokens/s.
    """
    rope = rope_angles(config, q_pos)
    new_states, into_last = [], h
    for w, state in zip(params_weights, states, strict=True):
        into_last = h
        h, state = decoder_layer(w, config, h, q_pos, rope, kv, state)
        new_states.append(state)
    return h, new_states, into_last
