"""Partition specs for params, the KV cache, batches and the distillation train state.

Params: each tensor's logical axes (params.SCHEMA) map to mesh axes by LOGICAL_RULES, the one
place that says how the model is split (tensor parallel = "model", Megatron style):
  * q/k/v projections over (kv) heads; o_proj [H, h, D] over heads (its contraction ends in one
    all-reduce); MLP gate/up over F, down over F (one all-reduce);
  * embed_tokens [V, D] and lm_head [D, V] over the vocabulary (logits come out vocab-sharded);
  * SwiftKV stacked K/V [G, D, K, h] over kv heads, like the cache slots they fill; norms replicated.
Data parallel = "data" over the batch: the cache's block table and lengths are split by rows.

The KV pool [K, slots, h] is split over kv heads on "model" and *replicated* over "data". A row's
block table may point at any block of the pool, and rows share blocks (the prefix cache), so the
slot axis has no row locality: split over "data", every read of a row's blocks would become an
all-gather of the pool. Replicated, reads stay local and a step only all-gathers the few new
tokens' K/V; the price is that cache memory per device does not shrink with "data".
`shard_cache(..., pool_over_data=True)` trades the other way for memory-bound cases.

A dim that the axis does not divide (e.g. SmolLM2's 3 kv heads over 4 devices) falls back to
replicated along that axis with a warning naming the tensor, never an XLA error.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..model.params import (
    EMBED,
    HEAD_DIM,
    HEADS,
    KINDS,
    KV_GROUP,
    KV_HEADS,
    MLP,
    QUANT_BLOCKS,
    VOCAB,
    Params,
    kind_name,
)
from .mesh import DATA, MODEL, ShardingError, mesh_sizes

# Logical axis -> mesh axis (None: replicated).
LOGICAL_RULES: dict[str, str | None] = {
    VOCAB: MODEL, HEADS: MODEL, KV_HEADS: MODEL, MLP: MODEL,
    EMBED: None, HEAD_DIM: None, KV_GROUP: None, QUANT_BLOCKS: None,
}


class ShardingFallbackWarning(UserWarning):
    """A tensor dim that the mesh axis does not divide: that tensor is replicated along the axis."""


path_name = kind_name  # 'layers/*/mlp/gate_proj' for a key path


def logical_spec(axes: Sequence[str]) -> tuple[str | None, ...]:
    """Mesh axis per dim for logical `axes`, by LOGICAL_RULES."""
    return tuple(LOGICAL_RULES[a] for a in axes)


def fit_spec(name: str, shape: Sequence[int], spec: Sequence[str | None],
             sizes: Mapping[str, int], fallbacks: dict[str, str] | None = None) -> P:
    """`spec` with every axis that does not divide its dim dropped (that dim replicated).

    Dropped axes are recorded in `fallbacks` (tensor name -> reason) for one warning per tensor.
    """
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    out = []
    for dim, axis in zip(shape, spec):
        n = sizes.get(axis, 1) if axis else 1
        if axis is None or n == 1:
            out.append(None)  # an axis of size 1 splits nothing: keep specs simple
        elif dim % n:
            out.append(None)
            if fallbacks is not None:
                fallbacks[name] = f"dim {dim} does not divide over {axis}={n}"
        else:
            out.append(axis)
    return P(*out)


def _warn(fallbacks: Mapping[str, str]) -> None:
    for name, why in sorted(fallbacks.items()):
        warnings.warn(f"sharding: {name} is replicated instead of split ({why})",
                      ShardingFallbackWarning, stacklevel=3)


def param_spec(name: str, shape: Sequence[int], sizes: Mapping[str, int],
               fallbacks: dict[str, str] | None = None) -> P:
    """The PartitionSpec of the params leaf called `name` ('layers/*/q_proj'), from its schema
    entry's logical axes."""
    kind = KINDS.get(name)
    if kind is None:
        raise ShardingError(f"params leaf {name!r} {tuple(shape)} is not in params.SCHEMA; "
                            "declare it there (its logical axes give its partition spec)")
    return fit_spec(name, shape, logical_spec(kind.axes), sizes, fallbacks)


def _weights_of(tree: Any) -> Any:
    return tree.weights if isinstance(tree, Params) else tree


def param_specs(weights: Any, mesh: Mesh | Mapping[str, int], warn: bool = True) -> Any:
    """A pytree of PartitionSpecs like `weights` (arrays, ShapeDtypeStructs or orbax metadata:
    anything with `.shape`)."""
    sizes, fallbacks = mesh_sizes(mesh), {}
    specs = jax.tree_util.tree_map_with_path(
        lambda path, x: param_spec(path_name(path), x.shape, sizes, fallbacks), _weights_of(weights))
    if warn:
        _warn(fallbacks)
    return specs


def named(specs: Any, mesh: Mesh) -> Any:
    """A pytree of PartitionSpecs -> the same tree of NamedShardings on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def params_shardings(weights: Any, mesh: Mesh) -> Any:
    """A pytree of NamedShardings like `weights` (also for an orbax restore target)."""
    return named(param_specs(weights, mesh), mesh)


def shard_params(params: Params, mesh: Mesh) -> Params:
    """`params` placed on `mesh` by the partition rules (a tensor-parallel copy of each leaf)."""
    return Params(jax.device_put(params.weights, params_shardings(params.weights, mesh)),
                  params.config)


# -- the KV cache --------------------------------------------------------------------------------

def pool_spec(num_kv_heads: int, mesh: Mesh | Mapping[str, int], pool_over_data: bool = False,
              num_slots: int | None = None, fallbacks: dict[str, str] | None = None) -> P:
    """Spec of a cache pool [K, slots, h]: kv heads over "model" (as the K/V projections are);
    slots over "data" only on request (see the module docstring)."""
    spec = (LOGICAL_RULES[KV_HEADS], DATA if pool_over_data else None, None)
    return fit_spec("cache pool [kv_heads, slots, head_dim]", (num_kv_heads, num_slots or 0, 1),
                    spec, mesh_sizes(mesh), fallbacks)


def cache_specs(cache: Any, mesh: Mesh | Mapping[str, int], pool_over_data: bool = False,
                warn: bool = True) -> Any:
    """A KVCache of PartitionSpecs for `cache` (arrays or ShapeDtypeStructs)."""
    sizes, fallbacks = mesh_sizes(mesh), {}
    k0 = cache.k[0]
    pool = pool_spec(k0.shape[0], sizes, pool_over_data, k0.shape[1], fallbacks)
    rows = cache.block_table.shape[0]
    table = fit_spec("cache block_table [batch, blocks]", cache.block_table.shape, (DATA, None),
                     sizes, fallbacks)
    lengths = fit_spec("cache lengths [batch]", (rows,), (DATA,), sizes, fallbacks)
    if warn:
        _warn(fallbacks)
    index = jax.tree.map(lambda _: P(), cache.index)  # per-block metadata: small, replicated
    return dataclasses.replace(cache, k=[pool] * len(cache.k), v=[pool] * len(cache.v),
                               block_table=table, lengths=lengths, index=index)


def cache_shardings(cache: Any, mesh: Mesh, pool_over_data: bool = False) -> Any:
    """NamedShardings for a KVCache (see cache_specs)."""
    return named(cache_specs(cache, mesh, pool_over_data), mesh)


def shard_cache(cache: Any, mesh: Mesh, pool_over_data: bool = False) -> Any:
    """`cache` placed on `mesh`: pools over kv heads, block table and lengths over rows."""
    return jax.device_put(cache, cache_shardings(cache, mesh, pool_over_data))


def sharded_zeros(shape: Sequence[int], dtype: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """Zeros created in place on `sharding`: each device allocates only its shard."""
    return jax.jit(lambda: jnp.zeros(tuple(shape), dtype), out_shardings=sharding)()


# -- batches (data parallel) ---------------------------------------------------------------------

def shard_batch(batch: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
    """Every array of `batch` split over "data" along `batch_axis` (replicated if it does not
    divide); e.g. distillation batches [accum, B, T] use batch_axis=1."""
    sizes, fallbacks = mesh_sizes(mesh), {}

    def put(path, x):
        spec = [None] * np.ndim(x)
        spec[batch_axis] = DATA
        return jax.device_put(x, NamedSharding(
            mesh, fit_spec(f"batch {path_name(path)}", np.shape(x), spec, sizes, fallbacks)))

    out = jax.tree_util.tree_map_with_path(put, batch)
    _warn(fallbacks)
    return out


def shard_like(tree: Any, reference: Any) -> Any:
    """`tree` placed like `reference` (leaf by leaf, same structure), e.g. a restored state."""
    return jax.tree.map(lambda x, r: jax.device_put(x, r.sharding), tree, reference)


# -- distillation train state -------------------------------------------------------------------

def _trainable_kind(path: Sequence[Any]) -> str | None:
    """The schema kind a train-state leaf belongs to: the trainable weights and their optimizer
    moments are dicts keyed by kind name (params.trainable_of), wherever optax nests them."""
    for entry in path:
        key = getattr(entry, "key", None)
        if isinstance(key, str) and key in KINDS:
            return key
    return None


def train_state_specs(state: Any, mesh: Mesh | Mapping[str, int], warn: bool = True) -> Any:
    """PartitionSpecs for a distillation train state ({"step", "trainable", "opt_state"}, see
    train/distill.py): every trainable weight and its optimizer moments split like the param it is
    (by its schema axes), scalars replicated. Also the restore target for a state saved on
    another mesh."""
    sizes, fallbacks = mesh_sizes(mesh), {}

    def spec(path, x):
        kind = _trainable_kind(path)
        rule = () if kind is None or np.ndim(x) == 0 else logical_spec(KINDS[kind].axes)
        return fit_spec(f"train state {path_name(path)}", np.shape(x), rule, sizes, fallbacks)

    specs = jax.tree_util.tree_map_with_path(spec, state)
    if warn:
        _warn(fallbacks)
    return specs


def train_state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for a distillation train state (see train_state_specs)."""
    return named(train_state_specs(state, mesh), mesh)


def restore_target(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or structs) on `shardings`: an orbax restore target that
    places every array straight onto its shard (e.g. a train state saved on another mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        tree, shardings)
