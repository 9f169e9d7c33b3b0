"""Plain Llama params -> SwiftKV params, with the initialisation rules of SWIFTKV.md."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import ConfigError
from .params import Params


def to_swiftkv(params: Params, num_key_value_layers: int, group_size: int = 1) -> Params:
    """SwiftKV params with L = `num_key_value_layers` and AcrossKV group size `group_size`.

    q_proj_swiftkv <- q_proj; a group leader's k/v_proj_swiftkv <- mean of k/v_proj over its g
    layers; norm_swiftkv <- layer L's input_layernorm. The upper layers keep their original
    q/k/v_proj, which the distillation teacher uses.
    """
    cfg = params.config
    if cfg.swiftkv:
        raise ConfigError("these params are already SwiftKV; convert the plain model instead")
    new_cfg = cfg.replace(num_key_value_layers=num_key_value_layers, key_value_group_size=group_size)
    L, g, n_groups = num_key_value_layers, group_size, new_cfg.num_kv_groups
    layers = params.weights["lower"]
    weights = {k: v for k, v in params.weights.items() if k != "lower"}
    if L == cfg.num_layers:
        return Params(dict(weights, lower=layers), new_cfg)
    lower = jax.tree.map(lambda x: x[:L], layers)
    upper = jax.tree.map(lambda x: x[L:], layers)
    upper["q_proj_swiftkv"] = upper["q_proj"]

    def group_mean(w: jax.Array) -> jax.Array:
        return w.reshape((n_groups, g) + w.shape[1:]).astype(jnp.float32).mean(axis=1).astype(w.dtype)

    weights.update(lower=lower, upper=upper, swiftkv={
        "norm": {"weight": layers["input_layernorm"]["weight"][L]},
        "k_proj": group_mean(upper["k_proj"]),
        "v_proj": group_mean(upper["v_proj"]),
    })
    return Params(weights, new_cfg)
