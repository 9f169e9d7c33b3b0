"""Least-squares initialisation of the SwiftKV K/V projections from calibration activations.

SWIFTKV.md initialises a group leader's k/v_proj_swiftkv with the mean of its layers' k/v_proj,
which are applied to `s = norm_swiftkv(h_L)` instead of each layer's own input: a crude start. Here
each group's projections are instead the ridge regression of the (pre-RoPE) keys and values that
the base model's own layers produce from their own inputs, on `s`:
`W = argmin sum_l ||S W - X_l W_l||^2 = (S^T S + r I)^-1 S^T mean_l(X_l W_l)`, l over the group.
RoPE is the same rotation on both sides, so fitting before it is exact for keys too.
Models with q/k/v biases (Qwen2) fit the SwiftKV bias with the weight: S gets a column of ones
(not regularised) and the targets are X_l W_l + b_l.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..model.forward import lower_hidden
from ..model.kv_access import ChunkKV
from ..model.layers import attention_input, rms_norm, run_layers
from ..model.params import Params
from ..model.swiftkv import swiftkv_off


def layer_inputs(params: Params, tokens: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    """(s [B, T, D], the normed input x_l [B, T, D] of every layer l >= L on the base model's path)."""
    cfg = params.config
    teacher = swiftkv_off(params)
    h = lower_hidden(params, tokens)
    s = rms_norm(h, params.weights["swiftkv"]["norm"]["weight"], cfg.rms_norm_eps)
    q_pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    inputs = []
    for i in range(cfg.num_key_value_layers, cfg.num_layers):
        layer = teacher.weights["layers"][i]
        inputs.append(attention_input(layer, cfg, h))
        h, _, _ = run_layers([layer], cfg, h, q_pos, ChunkKV(q_pos), [None])
    return s, inputs


def fit_swiftkv_kv(params: Params, tokens: np.ndarray, weights: np.ndarray | None = None,
                   ridge: float = 1e-4, batch_size: int = 4) -> Params:
    """`params` with every group leader's k/v_proj_swiftkv fitted by ridge least squares on the
    calibration rows `tokens` [R, T] (positions with `weights` 0 left out). `ridge` is relative to
    the mean diagonal of S^T S."""
    cfg = params.config
    L, g, G = cfg.num_key_value_layers, cfg.key_value_group_size, cfg.num_kv_groups
    d, biased = cfg.hidden_size, cfg.attention_bias
    n = d + biased  # the regression's inputs: s, and a constant 1 for the bias
    layers = params.weights["layers"]
    gram = np.zeros((n, n))
    cross = {name: np.zeros((G, n, cfg.num_kv_heads * cfg.head_dim)) for name in ("k", "v")}
    collect = jax.jit(layer_inputs)
    for start in range(0, len(tokens), batch_size):
        s, xs = collect(params, jnp.asarray(tokens[start:start + batch_size]))
        keep = (np.ones(s.shape[:2], bool) if weights is None
                else np.asarray(weights[start:start + batch_size]) > 0).reshape(-1)
        s = np.asarray(s, np.float64).reshape(-1, d)[keep]
        if biased:
            s = np.concatenate([s, np.ones((len(s), 1))], axis=1)
        gram += s.T @ s
        for j, x in enumerate(xs):
            x = np.asarray(x, np.float64).reshape(-1, d)[keep]
            sx = s.T @ x  # S^T X_l, so S^T X_l W_l costs one D x D product per weight
            for name in cross:
                w = np.asarray(layers[L + j][f"{name}_proj"], np.float64).reshape(d, -1)
                target = sx @ w
                if biased:  # S^T (X_l W_l + 1 b_l^T)
                    target += np.outer(s.sum(axis=0), np.asarray(layers[L + j][f"{name}_bias"]).reshape(-1))
                cross[name][j // g] += target / g
    gram[:d, :d] += ridge * np.trace(gram[:d, :d]) / d * np.eye(d)
    fitted = {name: np.stack([np.linalg.solve(gram, c) for c in cross[name]]) for name in cross}
    sw = dict(params.weights["swiftkv"])
    for name, w in fitted.items():
        proj = sw[f"{name}_proj"]
        sw[f"{name}_proj"] = jnp.asarray(w[:, :d].reshape(proj.shape), proj.dtype)
        if biased:
            bias = sw[f"{name}_bias"]
            sw[f"{name}_bias"] = jnp.asarray(w[:, d].reshape(bias.shape), bias.dtype)
    return Params(dict(params.weights, swiftkv=sw), cfg)
