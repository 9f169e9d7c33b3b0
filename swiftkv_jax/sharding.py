"""Beyond one device: a Mesh, partition rules for params and the KV cache, multi-host start-up.

Everything runs on JAX's own SPMD engine: arrays carry a NamedSharding over a 2-D mesh
("data", "model") and the unchanged jitted functions (`prefill`, the `decode` while_loop, the
prefix-cache `admit`/`register`, the distillation step) are partitioned by XLA (GSPMD), which
inserts the collectives. No hand-written communication.

Partition rules (tensor parallel = "model" axis, Megatron style):
  * q_proj / q_proj_swiftkv [D, H, h] and k_proj / v_proj [D, K, h]: over heads; o_proj
    [H, h, D] over heads (its contraction ends in one all-reduce);
  * MLP gate/up [D, F] over F, down [F, D] over F (one all-reduce);
  * embed_tokens [V, D] and lm_head [D, V] over the vocabulary (logits come out vocab-sharded);
  * SwiftKV stacked K/V [G, D, K, h] over kv heads, like the cache slots they fill;
  * norms: replicated (tiny).
Data parallel = "data" axis over the batch: the cache's block table and lengths are split by
rows, and the activations follow them.

The KV pool [K, slots, h] is split over kv heads on "model" and *replicated* over "data". A
row's block table may point at any block of the pool, and rows share blocks (the prefix cache),
so the slot axis has no row locality: split over "data", every read of a row's blocks would
become an all-gather of the pool. Replicated over "data", reads stay local and a step only
all-gathers the few new tokens' K/V. The price: each data replica holds the whole pool, so
cache memory per device does not shrink with "data" (for serving, scale batch over "model"
first, or run independent replicas). `shard_cache(..., pool_over_data=True)` trades the other
way (pool memory / data, at the cost of pool all-gathers) for memory-bound cases.

A dim that the axis does not divide (e.g. SmolLM2's 3 kv heads over 4 devices) falls back to
replicated along that axis with a warning naming the tensor, never an XLA error.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .config import ModelConfig
from .params import Params

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)


class ShardingError(ValueError):
    """A mesh that cannot be built as asked; the message says what to change."""


class ShardingFallbackWarning(UserWarning):
    """A tensor dim that the mesh axis does not divide: that tensor is replicated along the axis."""


# -- the mesh ------------------------------------------------------------------------------------

def parse_mesh(spec: str | Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
    """{"data": d, "model": m} from "data=2,model=4" (or "2x4", a dict, or None = all on model).

    One size may be -1 ("the rest"). The product must equal `num_devices`.
    """
    if spec is None:
        sizes = {DATA: 1, MODEL: -1}
    elif isinstance(spec, Mapping):
        sizes = {str(k): int(v) for k, v in spec.items()}
    else:
        text = str(spec).replace(" ", "")
        try:
            if "=" in text:
                sizes = {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}
            else:
                sizes = dict(zip(AXES, (int(v) for v in text.lower().split("x")), strict=True))
        except ValueError as e:
            raise ShardingError(f"cannot read mesh {spec!r}: write e.g. 'data=2,model=4' or '2x4'") from e
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise ShardingError(f"mesh axes must be among {AXES}, got {sorted(unknown)} in {spec!r}")
    sizes = {DATA: sizes.get(DATA, 1), MODEL: sizes.get(MODEL, 1)}
    rest = [k for k, v in sizes.items() if v == -1]
    if len(rest) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise ShardingError(f"mesh sizes must be positive (one may be -1 = the rest), got {spec!r}")
    if rest:
        known = math.prod(v for v in sizes.values() if v != -1)
        if num_devices % known:
            raise ShardingError(f"mesh {spec!r}: {num_devices} devices do not split by {known}")
        sizes[rest[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ShardingError(f"mesh {spec!r} has {math.prod(sizes.values())} devices but "
                            f"{num_devices} are available; the sizes must multiply to that")
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") Mesh over `devices` (default: every device of every process).

    "model" is the fast axis: its devices are neighbours (same host / ICI ring), where the
    per-layer all-reduces of tensor parallelism run; "data" spans hosts.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    shape = (sizes[DATA], sizes[MODEL])
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # odd device counts / CPU: plain row-major order is fine
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES)


def mesh_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    """{"data": n, "model": m} of a Mesh or a sizes dict (a missing axis is 1), so the rules
    work on real meshes and on sizes alone (memory estimates)."""
    sizes = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
    return {DATA: sizes.get(DATA, 1), MODEL: sizes.get(MODEL, 1)}


# -- partition rules -----------------------------------------------------------------------------

# (regex over the key path "layers/*/mlp/gate_proj", spec per dim). First match wins.
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed_tokens", (MODEL, None)),  # [V, D] vocabulary parallel
    (r"lm_head", (None, MODEL)),  # [D, V]
    (r"layers/\*/(q_proj|q_proj_swiftkv|k_proj|v_proj)", (None, MODEL, None)),  # [D, heads, h]
    (r"layers/\*/o_proj", (MODEL, None, None)),  # [H, h, D]
    (r"layers/\*/mlp/(gate_proj|up_proj)", (None, MODEL)),  # [D, F]
    (r"layers/\*/mlp/down_proj", (MODEL, None)),  # [F, D]
    (r"swiftkv/(k_proj|v_proj)", (None, None, MODEL, None)),  # [G, D, K, h]
    (r".*norm.*", ()),  # replicated
)


def _key_str(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_name(path: Sequence[Any]) -> str:
    """'layers/*/mlp/gate_proj' for a key path (layer numbers folded into '*')."""
    parts = [_key_str(k) for k in path]
    return "/".join("*" if p.isdigit() else p for p in parts)


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
    """The PartitionSpec of the params leaf called `name` (see PARAM_RULES)."""
    for pattern, spec in PARAM_RULES:
        if re.fullmatch(pattern, name):
            return fit_spec(name, shape, spec, sizes, fallbacks)
    raise ShardingError(f"no partition rule for params leaf {name!r} {tuple(shape)}; "
                        "add one to sharding.PARAM_RULES")


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


def _named(specs: Any, mesh: Mesh) -> Any:
    """A pytree of PartitionSpecs -> the same tree of NamedShardings on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def params_shardings(weights: Any, mesh: Mesh) -> Any:
    """A pytree of NamedShardings like `weights` (also for an orbax restore target)."""
    return _named(param_specs(weights, mesh), mesh)


def shard_params(params: Params, mesh: Mesh) -> Params:
    """`params` placed on `mesh` by the partition rules (a tensor-parallel copy of each leaf)."""
    return Params(jax.device_put(params.weights, params_shardings(params.weights, mesh)),
                  params.config)


# -- the KV cache --------------------------------------------------------------------------------

def pool_spec(num_kv_heads: int, mesh: Mesh | Mapping[str, int], pool_over_data: bool = False,
              num_slots: int | None = None, fallbacks: dict[str, str] | None = None) -> P:
    """Spec of a cache pool [K, slots, h]: kv heads over "model"; slots over "data" only on request
    (see the module docstring for why the default replicates the pool over "data")."""
    sizes = mesh_sizes(mesh)
    spec = (MODEL, DATA if pool_over_data else None, None)
    return fit_spec("cache pool [kv_heads, slots, head_dim]", (num_kv_heads, num_slots or 0, 1),
                    spec, sizes, fallbacks)


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
    return _named(cache_specs(cache, mesh, pool_over_data), mesh)


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

def train_state_specs(state: Any, mesh: Mesh | Mapping[str, int], warn: bool = True) -> Any:
    """PartitionSpecs for a distillation train state ({"step", "trainable", "opt_state"}, see
    distill.py): the trainable SwiftKV weights and their optimizer moments split like the params
    they come from (q_proj_swiftkv [D, H, h] over heads, stacked K/V [G, D, K, h] over kv heads),
    scalars and norms replicated. Also the restore target for a state saved on another mesh."""
    sizes, fallbacks = mesh_sizes(mesh), {}

    def spec(path, x):
        name, nd = path_name(path), np.ndim(x)
        rule: tuple = ()
        if nd == 3 and "q_proj" in name:
            rule = (None, MODEL, None)
        elif nd == 4 and ("k_proj" in name or "v_proj" in name):
            rule = (None, None, MODEL, None)
        return fit_spec(f"train state {name}", np.shape(x), rule, sizes, fallbacks)

    specs = jax.tree_util.tree_map_with_path(spec, state)
    if warn:
        _warn(fallbacks)
    return specs


def train_state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for a distillation train state (see train_state_specs)."""
    return _named(train_state_specs(state, mesh), mesh)


def restore_target(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or structs) on `shardings`: an orbax restore target that
    places every array straight onto its shard (e.g. a train state saved on another mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        tree, shardings)


# -- multi-host ----------------------------------------------------------------------------------

def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None, **kwargs: Any) -> None:
    """Joins this process to a multi-host JAX job (call it before anything touches a device).

    * TPU pods (Cloud TPU VMs): call with no arguments on every host; JAX finds the
      coordinator and the process ids itself.
    * Multi-node GPU under SLURM or Open MPI: no arguments either (JAX reads the scheduler's
      environment); elsewhere give `coordinator_address="host0:1234"`, `num_processes` and this
      host's `process_id` (0 .. n-1) on every host, and `local_device_ids` if a host runs one
      process per GPU.
    Afterwards `jax.devices()` lists every device of every host: build one mesh over them with
    `make_mesh(...)` and run the same program on every host (SPMD). Calling it twice is harmless.
    """
    from jax._src import distributed
    if distributed.global_state.client is not None:
        return
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids, **kwargs)


# -- memory, from the config alone ---------------------------------------------------------------

def abstract_weights(config: ModelConfig, dtype: Any = jnp.bfloat16, teacher: bool = False) -> Any:
    """ShapeDtypeStructs of the params pytree of `config` (Params' layout), with no arrays made.

    `teacher=False` leaves out the original q/k/v_proj of SwiftKV layers >= L (inference does
    not read them; distillation's teacher does)."""
    c = config
    d, f, h, k, hd, v = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim,
                         c.vocab_size)
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
    layers = []
    for i in range(c.num_layers):
        layer = {"input_layernorm": {"weight": s(d)}, "post_attention_layernorm": {"weight": s(d)},
                 "o_proj": s(h, hd, d),
                 "mlp": {"gate_proj": s(d, f), "up_proj": s(d, f), "down_proj": s(f, d)}}
        upper = i >= c.num_key_value_layers
        if not upper or teacher:
            layer.update(q_proj=s(d, h, hd), k_proj=s(d, k, hd), v_proj=s(d, k, hd))
        if upper:
            layer["q_proj_swiftkv"] = s(d, h, hd)
        layers.append(layer)
    w: dict[str, Any] = {"embed_tokens": s(v, d), "layers": layers, "norm": {"weight": s(d)}}
    if not c.tie_word_embeddings:
        w["lm_head"] = s(d, v)
    if c.swiftkv:
        g = c.num_kv_groups
        w["swiftkv"] = {"norm": {"weight": s(d)}, "k_proj": s(g, d, k, hd), "v_proj": s(g, d, k, hd)}
    return w


def shard_bytes(shape: Sequence[int], itemsize: int, spec: P, sizes: Mapping[str, int]) -> int:
    """Bytes of one device's shard of an array of `shape` split by `spec`."""
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    per = [dim // (sizes[a] if a else 1) for dim, a in zip(shape, spec)]
    return math.prod(per) * itemsize


def memory_per_device(config: ModelConfig, mesh: Mesh | Mapping[str, int] | str,
                      dtype: Any = jnp.bfloat16, batch_size: int = 8, max_length: int = 8192,
                      pool_over_data: bool = False, teacher: bool = False) -> dict[str, int]:
    """Per-device bytes of params and of a KV pool of `batch_size` rows x `max_length` tokens
    under the partition rules, from the config alone (no arrays). `teacher`: count the original
    q/k/v_proj of SwiftKV layers >= L too (distillation keeps them; inference does not need them).
    Device memory also holds activations and XLA's temporaries, not counted here."""
    if isinstance(mesh, str):
        sizes = parse_mesh(mesh, _count(mesh))
    else:
        sizes = mesh_sizes(mesh)
    itemsize = jnp.dtype(dtype).itemsize
    weights = abstract_weights(config, dtype, teacher)
    specs = param_specs(weights, sizes, warn=False)
    param_bytes = sum(shard_bytes(x.shape, itemsize, sp, sizes) for x, sp in zip(
        jax.tree.leaves(weights), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))))
    slots = batch_size * max_length
    pool = pool_spec(config.num_kv_heads, sizes, pool_over_data, slots)
    per_pool = shard_bytes((config.num_kv_heads, slots, config.head_dim), itemsize, pool, sizes)
    return {"params": param_bytes, "cache": 2 * config.num_cache_layers * per_pool,
            "params_total": sum(math.prod(x.shape) * itemsize for x in jax.tree.leaves(weights)),
            "cache_total": 2 * config.num_cache_layers * slots * config.num_kv_heads
            * config.head_dim * itemsize}


def _count(spec: str) -> int:
    """Devices a fully specified mesh string names ("data=2,model=4" or "2x4")."""
    text = spec.replace(" ", "")
    if "=" in text:
        return math.prod(int(item.split("=")[1]) for item in text.split(",") if item)
    return math.prod(int(v) for v in text.lower().split("x"))
