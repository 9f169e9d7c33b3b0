"""The (SwiftKV) Llama as a tree of Flax NNX modules, built from the weights schema (params.SCHEMA).

Why NNX (Flax's current API, not Linen): a module is a plain Python object holding its variables,
so the model can be inspected (`nnx.display(model)`, `model.layers[3].mlp.up_proj`), filtered
(`nnx.state(model, DistilledParam)`), trained with `nnx.Optimizer` and optax, or rewritten by a
library that swaps modules, and `nnx.split(model)` turns it into (graphdef, state): a pytree that
jitted code takes and returns, which is how this project runs everything.

Every parameter is made from its schema entry: its place in the tree is the entry's path, its
value has the entry's shape for the config (and the schema's initialiser, through init_params),
and its metadata carries the entry's logical axes (`out_sharding`; sharding/partitioning.py maps
them to mesh axes) and the Hugging Face name. The schema stays the one declaration: the module
tree's state as a pure dict *is* `Params.weights` (layers a list). The computation stays the pure
functions of forward.py, which `Llama.__call__` applies to the module's own parameters, so
`forward(params, cache, tokens)` and every jitted step remain functions of pytrees with the cache
donated.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from ..config import ModelConfig
from .forward import forward, init_params
from .layers import mlp, rms_norm
from .paged_cache import PagedCache
from .params import Params, Weights, get_path, tensors


class DistilledParam(nnx.Param):
    """A parameter SwiftKV distillation trains (the schema's `trainable` entries): pass it as an
    nnx filter to train only those (`nnx.Optimizer(model, tx, wrt=DistilledParam)`)."""


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned scale `weight` [D]."""

    def __init__(self, eps: float):
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class MLP(nnx.Module):
    """SwiGLU: down_proj(silu(gate_proj x) * up_proj x)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return mlp({name: getattr(self, name)[...] for name in ("gate_proj", "up_proj", "down_proj")}, x)


class DecoderLayer(nnx.Module):
    """One layer's parameters: norms, q/k/v/o projections (and q_proj_swiftkv on SwiftKV layers
    >= L), the MLP. Its computation is layers.decoder_layer / swiftkv_layers.swiftkv_layer."""


class SwiftKVProjections(nnx.Module):
    """SwiftKV's shared part: norm_swiftkv and the group leaders' K/V projections, stacked."""


class Llama(nnx.Module):
    """A (SwiftKV) Llama: embed_tokens, layers, norm, lm_head (untied only), swiftkv (L < N).

    `Llama(config, rngs=nnx.Rngs(0))` makes random weights by the schema's initialisers;
    `Llama.from_params(params)` wraps loaded weights (sk.load: HF, GGUF, orbax) without copying;
    `model.params` gives them back as the Params every function of this library takes.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None,
                 params: Params | None = None):
        if params is None:
            if rngs is None:
                raise ValueError("Llama(config) needs rngs=nnx.Rngs(seed) for random weights, or "
                                 "use Llama.from_params(params) for loaded ones")
            params = init_params(config, rngs.params())
        elif params.config != config:
            raise ValueError("params were made for another config than the one given")
        if config.quantization:
            raise ValueError(f"the NNX modules hold float weights; these params are "
                             f"{config.quantization}: wrap params.dequantize(), or use the functions "
                             "(sk.forward, sk.generate, sk.Engine) on the int8 params directly")
        cfg = self.config = config
        self.layers = nnx.List([DecoderLayer() for _ in range(cfg.num_layers)])
        for t in tensors(cfg):
            if t.optional and not _has(params.weights, t.path):
                continue  # a SwiftKV layer's original q/k/v_proj, absent from this checkpoint
            param = DistilledParam if t.kind.trainable else nnx.Param
            node = self
            for name in t.path[:-1]:
                node = node[name] if isinstance(node, nnx.List) else _child(node, name, cfg)
            value = get_path(params.weights, t.path)
            if value.shape != t.shape:
                raise ValueError(f"{'/'.join(map(str, t.path))} has shape {value.shape}; the schema "
                                 f"says {t.shape} for this config")
            setattr(node, t.path[-1], param(value, out_sharding=t.kind.axes, eager_sharding=False,
                                            hf_name=t.kind.hf))

    @classmethod
    def from_params(cls, params: Params) -> "Llama":
        """The module tree over `params`' arrays (shared, not copied)."""
        return cls(params.config, params=params)

    @property
    def params(self) -> Params:
        """The module's weights as Params (the arrays themselves, laid out as the schema says)."""
        return params_of(nnx.state(self, nnx.Param), self.config)

    def __call__(self, cache: PagedCache | None, tokens: jax.Array, num_new: jax.Array | None = None,
                 *, all_logits: bool = False) -> tuple[jax.Array, PagedCache | None]:
        """forward(self.params, cache, tokens, num_new): logits and the updated cache."""
        return forward(self.params, cache, tokens, num_new, all_logits=all_logits)


def params_of(state: nnx.State, config: ModelConfig) -> Params:
    """Params from a Llama's parameter state (nnx.state(model) or the state half of nnx.split)."""
    pure = nnx.to_pure_dict(state)
    layers = pure.pop("layers", {})
    weights: Weights = dict(pure, layers=[layers[i] for i in range(config.num_layers)])
    return Params(weights, config)


_CONTAINERS = {"mlp": MLP, "swiftkv": SwiftKVProjections}


def _child(node: nnx.Module, name: str, cfg: ModelConfig) -> nnx.Module:
    """node.name, made on first use: a norm, the MLP or SwiftKV's shared part."""
    if not hasattr(node, name):
        cls = RMSNorm if name.endswith("norm") else _CONTAINERS[name]
        setattr(node, name, cls(cfg.rms_norm_eps) if cls is RMSNorm else cls())
    return getattr(node, name)


def _has(weights: Weights, path: tuple[Any, ...]) -> bool:
    try:
        get_path(weights, path)
        return True
    except (KeyError, IndexError):
        return False


__all__ = ["DecoderLayer", "DistilledParam", "Llama", "MLP", "RMSNorm", "SwiftKVProjections", "params_of"]
