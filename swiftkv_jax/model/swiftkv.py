"""Plain (Llama or Qwen2) params -> SwiftKV params, with the initialisation rules of SWIFTKV.md."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..config import ConfigError
from .params import Params


def to_swiftkv(params: Params, num_key_value_layers: int, group_size: int = 1) -> Params:
    """SwiftKV params with L = `num_key_value_layers` and AcrossKV group size `group_size`.

    q_proj_swiftkv <- q_proj; a group leader's k/v_proj_swiftkv <- mean of k/v_proj over its g
    layers; norm_swiftkv <- layer L's input_layernorm; biases (Qwen2) likewise. The upper layers
    keep their original q/k/v_proj, which the distillation teacher uses.
    """
    cfg = params.config
    if cfg.swiftkv:
        raise ConfigError("these params are already SwiftKV; convert the plain model instead")
    if cfg.quantization:
        raise ConfigError(f"these params are {cfg.quantization}; convert float params to SwiftKV "
                          "(then quantize), or call params.dequantize() first")
    new_cfg = cfg.replace(num_key_value_layers=num_key_value_layers, key_value_group_size=group_size)
    L, g, n_groups = num_key_value_layers, group_size, new_cfg.num_kv_groups
    layers = [dict(layer) for layer in params.weights["layers"]]
    weights = dict(params.weights, layers=layers)
    if L == cfg.num_layers:
        return Params(weights, new_cfg)
    bias = cfg.attention_bias
    for layer in layers[L:]:
        layer["q_proj_swiftkv"] = layer["q_proj"]
        if bias:
            layer["q_bias_swiftkv"] = layer["q_bias"]

    def group_mean(name: str) -> jax.Array:
        w = jnp.stack([layer[name] for layer in layers[L:]])
        w = w.reshape((n_groups, g) + w.shape[1:])
        return w.astype(jnp.float32).mean(axis=1).astype(w.dtype)

    weights["swiftkv"] = {
        "norm": {"weight": layers[L]["input_layernorm"]["weight"]},
        "k_proj": group_mean("k_proj"),
        "v_proj": group_mean("v_proj"),
    }
    if bias:
        weights["swiftkv"].update(k_bias=group_mean("k_bias"), v_bias=group_mean("v_bias"))
    return Params(weights, new_cfg)


def swiftkv_off(params: Params) -> Params:
    """The base Llama inside SwiftKV params (L = N, the upper layers' own q/k/v_proj).

    This is the distillation teacher and the "SwiftKV off" side of comparisons. Snowflake's
    checkpoints usually keep the original q/k/v; when they do not, there is no base model to run.
    """
    cfg = params.config
    if not cfg.swiftkv:
        return params
    upper = params.weights["layers"][cfg.num_key_value_layers:]
    needed = {"q_proj", "k_proj", "v_proj"}
    if cfg.attention_bias:
        needed |= {"q_bias", "k_bias", "v_bias"}
    missing = [cfg.num_key_value_layers + i for i, layer in enumerate(upper) if not needed <= layer.keys()]
    if missing:
        raise ConfigError(f"layers {missing} hold no original q/k/v_proj (only their SwiftKV "
                          "projections), so this checkpoint cannot run with SwiftKV off")
    layers = [{k: v for k, v in layer.items() if k not in ("q_proj_swiftkv", "q_bias_swiftkv")}
              for layer in params.weights["layers"]]
    weights = {k: v for k, v in params.weights.items() if k not in ("layers", "swiftkv")}
    return Params(dict(weights, layers=layers),
                  cfg.replace(num_key_value_layers=cfg.num_layers, key_value_group_size=1))
