"""The weights: one declarative schema of every tensor, and Params (the pytree that holds them).

`SCHEMA` lists each kind of tensor of a (SwiftKV) Llama once: its place in the pytree, its logical
axes (the shape follows from them and the config), its Hugging Face and GGUF names, how it is
initialised, which layers have it and whether distillation trains it. Everything else is derived
from it: `init_params` (forward.py), abstract shapes and partition specs (sharding/partitioning.py),
`memory_per_device` (sharding/memory.py), HF/GGUF import and export (io/weights.py, io/gguf.py), and the
distillation split `trainable_of` / `merge`. Adding a tensor is one entry here.

Because the config is static pytree metadata, `generate(params, cache, prompt)` and every jitted
function read the model's shape from `params` alone, and a new config means a new compilation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from . import int8

Weights = dict[str, Any]
Path = tuple[Any, ...]  # a key path into Weights: ("layers", 3, "mlp", "gate_proj")

# Logical axes. partitioning.LOGICAL_RULES maps them to mesh axes; their sizes come from the config.
VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, KV_GROUP = (
    "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "kv_group")
QUANT_BLOCKS = "quant_blocks"  # an int8 weight's scales: one per block of its inputs


def axis_sizes(cfg: ModelConfig) -> dict[str, int]:
    """The length of every logical axis for `cfg`."""
    return {VOCAB: cfg.vocab_size, EMBED: cfg.hidden_size, HEADS: cfg.num_heads,
            KV_HEADS: cfg.num_kv_heads, HEAD_DIM: cfg.head_dim, MLP: cfg.intermediate_size,
            KV_GROUP: cfg.num_kv_groups}


@dataclasses.dataclass(frozen=True)
class TensorKind:
    """One kind of weight tensor, as the schema declares it.

    name:       its key path with "*" for the layer number ("layers/*/mlp/gate_proj")
    axes:       logical axis of each dim (our layout: Linear weights are [in..., out...])
    hf:         Hugging Face name; "{i}" is the layer (for stacked kinds: each group leader's)
    gguf:       llama.cpp name ("{i}" likewise), or None when GGUF files do not hold it
    in_axes:    how many leading dims (of one HF tensor: a stacked kind's axis 0 not counted) are
                the input side of a Linear (HF stores [out, in]); 0 for tensors whose layout is the
                same in both (norms, the embedding table)
    init:       "normal" (std 0.02), "ones" or "zeros", for random weights (SwiftKV kinds start from the
                base model's weights by swiftkv.to_swiftkv's rules instead)
    where:      "model" (once), "layers" (every layer), "upper" (layers >= L) or "leaders"
                (stacked on axis 0 over the group leaders of layers >= L)
    when:       "always", "untied" (no tied embeddings), "swiftkv" (L < N), "bias" (q/k/v biases:
                Qwen2), "swiftkv_bias" (both) or "qk_norm" (per-head q/k norms: Qwen3)
    trainable:  distillation trains it (everything else is frozen)
    teacher:    on layers >= L, kept when a checkpoint has it but not read by the SwiftKV model
                (the original q/k/v_proj: the distillation teacher uses them)
    rope_heads: "heads" / "kv_heads" for q/k, whose rows llama.cpp permutes per head (Llama only)
    hf_flat:    Hugging Face stores it flattened to one dim (a bias [heads * head_dim])
    quant_in:   for the weights an int8 model stores as int8 (int8.py): which axes are the inputs
                of its matmul (the embedding's: D, as the tied LM head reads it); () keeps it float
    """

    name: str
    axes: tuple[str, ...]
    hf: str
    gguf: str | None = None
    in_axes: int = 1
    init: str = "normal"
    where: str = "layers"
    when: str = "always"
    trainable: bool = False
    teacher: bool = False
    rope_heads: str | None = None
    hf_flat: bool = False
    quant_in: tuple[int, ...] = ()

    def shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        """Our shape of this tensor for `cfg`."""
        sizes = axis_sizes(cfg)
        return tuple(sizes[a] for a in self.axes)

    def path(self, layer: int | None = None) -> Path:
        """The key path of this tensor (of `layer` for per-layer kinds)."""
        return tuple(layer if p == "*" else p for p in self.name.split("/"))

    @property
    def stacked(self) -> bool:
        """One array stacking a tensor per group leader on axis 0 (SwiftKV's K/V projections)."""
        return self.where == "leaders"

    @property
    def per_layer(self) -> bool:
        """One array in each layer's tree (a list over layers in trainable_of)."""
        return self.where in ("layers", "upper")

    def present(self, cfg: ModelConfig) -> bool:
        """Whether a model of `cfg` has this tensor at all."""
        return {"always": True, "untied": not cfg.tie_word_embeddings, "swiftkv": cfg.swiftkv,
                "bias": cfg.attention_bias, "swiftkv_bias": cfg.swiftkv and cfg.attention_bias,
                "qk_norm": cfg.qk_norm}[self.when]

    def layers(self, cfg: ModelConfig) -> range:
        """The layers that hold this per-layer kind (an empty range for model-level kinds)."""
        if self.where == "layers":
            return range(cfg.num_layers)
        if self.where == "upper":
            return range(cfg.num_key_value_layers, cfg.num_layers)
        return range(0)


def _attn(proj: str, gguf: str, axes: tuple[str, ...], in_axes: int = 1, **kw: Any) -> TensorKind:
    return TensorKind(f"layers/*/{proj}", axes, f"model.layers.{{i}}.self_attn.{proj}.weight",
                      f"blk.{{i}}.{gguf}.weight", in_axes=in_axes,
                      quant_in=tuple(range(in_axes)), **kw)


def _mlp(proj: str, gguf: str, axes: tuple[str, ...]) -> TensorKind:
    return TensorKind(f"layers/*/mlp/{proj}", axes, f"model.layers.{{i}}.mlp.{proj}.weight",
                      f"blk.{{i}}.{gguf}.weight", quant_in=(0,))


def _norm(name: str, hf: str, gguf: str | None, axes: tuple[str, ...] = (EMBED,), **kw: Any) -> TensorKind:
    return TensorKind(f"{name}/weight", axes, hf, gguf, in_axes=0, init="ones", **kw)


def _bias(name: str, hf: str, gguf: str | None, axes: tuple[str, ...], **kw: Any) -> TensorKind:
    """A q/k/v projection's bias (Qwen2): zeros at random init, flattened in HF files."""
    return TensorKind(name, axes, hf, gguf, in_axes=0, init="zeros", hf_flat=True, **kw)


SCHEMA: tuple[TensorKind, ...] = (
    TensorKind("embed_tokens", (VOCAB, EMBED), "model.embed_tokens.weight", "token_embd.weight",
               in_axes=0, where="model", quant_in=(1,)),
    _norm("norm", "model.norm.weight", "output_norm.weight", where="model"),
    TensorKind("lm_head", (EMBED, VOCAB), "lm_head.weight", "output.weight", where="model",
               when="untied", quant_in=(0,)),
    _norm("layers/*/input_layernorm", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    _norm("layers/*/post_attention_layernorm", "model.layers.{i}.post_attention_layernorm.weight",
          "blk.{i}.ffn_norm.weight"),
    _attn("q_proj", "attn_q", (EMBED, HEADS, HEAD_DIM), teacher=True, rope_heads=HEADS),
    _attn("k_proj", "attn_k", (EMBED, KV_HEADS, HEAD_DIM), teacher=True, rope_heads=KV_HEADS),
    _attn("v_proj", "attn_v", (EMBED, KV_HEADS, HEAD_DIM), teacher=True),
    _attn("o_proj", "attn_output", (HEADS, HEAD_DIM, EMBED), in_axes=2),
    # Qwen2: q/k/v biases. Qwen3: per-head RMSNorm of q and k (before RoPE).
    _bias("layers/*/q_bias", "model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias",
          (HEADS, HEAD_DIM), when="bias", teacher=True),
    _bias("layers/*/k_bias", "model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias",
          (KV_HEADS, HEAD_DIM), when="bias", teacher=True),
    _bias("layers/*/v_bias", "model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias",
          (KV_HEADS, HEAD_DIM), when="bias", teacher=True),
    _norm("layers/*/q_norm", "model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight",
          (HEAD_DIM,), when="qk_norm"),
    _norm("layers/*/k_norm", "model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight",
          (HEAD_DIM,), when="qk_norm"),
    _mlp("gate_proj", "ffn_gate", (EMBED, MLP)),
    _mlp("up_proj", "ffn_up", (EMBED, MLP)),
    _mlp("down_proj", "ffn_down", (MLP, EMBED)),
    # SwiftKV (SWIFTKV.md): queries of layers >= L, norm_swiftkv, the group leaders' K/V stacked.
    TensorKind("layers/*/q_proj_swiftkv", (EMBED, HEADS, HEAD_DIM),
               "model.layers.{i}.self_attn.q_proj_swiftkv.weight", where="upper", when="swiftkv",
               trainable=True, quant_in=(0,)),
    _bias("layers/*/q_bias_swiftkv", "model.layers.{i}.self_attn.q_proj_swiftkv.bias", None,
          (HEADS, HEAD_DIM), where="upper", when="swiftkv_bias", trainable=True),
    _norm("swiftkv/norm", "model.norm_swiftkv.weight", None, where="model", when="swiftkv",
          trainable=True),
    TensorKind("swiftkv/k_proj", (KV_GROUP, EMBED, KV_HEADS, HEAD_DIM),
               "model.layers.{i}.self_attn.k_proj_swiftkv.weight", where="leaders", when="swiftkv",
               trainable=True, quant_in=(1,)),
    TensorKind("swiftkv/v_proj", (KV_GROUP, EMBED, KV_HEADS, HEAD_DIM),
               "model.layers.{i}.self_attn.v_proj_swiftkv.weight", where="leaders", when="swiftkv",
               trainable=True, quant_in=(1,)),
    _bias("swiftkv/k_bias", "model.layers.{i}.self_attn.k_proj_swiftkv.bias", None,
          (KV_GROUP, KV_HEADS, HEAD_DIM), where="leaders", when="swiftkv_bias", trainable=True),
    _bias("swiftkv/v_bias", "model.layers.{i}.self_attn.v_proj_swiftkv.bias", None,
          (KV_GROUP, KV_HEADS, HEAD_DIM), where="leaders", when="swiftkv_bias", trainable=True),
)


def int8_kinds(kind: TensorKind) -> tuple[TensorKind, TensorKind]:
    """The two leaves an int8 model stores for a quantised kind: `<name>/values` (its axes reordered
    outputs first, inputs last) and `<name>/scales` (outputs, then one per block of inputs)."""
    out = tuple(a for i, a in enumerate(kind.axes) if i not in kind.quant_in)
    ins = tuple(kind.axes[i] for i in kind.quant_in)
    plain = dict(hf="", gguf=None, in_axes=0, quant_in=())
    return (dataclasses.replace(kind, name=f"{kind.name}/values", axes=out + ins, **plain),
            dataclasses.replace(kind, name=f"{kind.name}/scales", axes=out + (QUANT_BLOCKS,), **plain))


KINDS: dict[str, TensorKind] = {k.name: k for k in SCHEMA}
KINDS.update({q.name: q for k in SCHEMA if k.quant_in for q in int8_kinds(k)})


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One concrete tensor of a model: its kind, layer, key path and shape."""

    kind: TensorKind
    layer: int | None
    path: Path
    shape: tuple[int, ...]
    optional: bool  # a teacher-only tensor: loaded when the checkpoint has it

    @property
    def hf_names(self) -> tuple[str, ...]:
        """Its Hugging Face name; for a stacked kind, one per slice of axis 0 (group leaders)."""
        return tuple(self.kind.hf.format(i=i) for i in self._hf_layers)

    @property
    def _hf_layers(self) -> tuple[Any, ...]:
        return self.layer if isinstance(self.layer, tuple) else (self.layer,)

    @property
    def slice_shape(self) -> tuple[int, ...]:
        """The shape of one HF tensor of it (a stacked kind stacks several)."""
        return self.shape[1:] if self.kind.stacked else self.shape

    def _matrix(self) -> tuple[int, int]:
        s, n = self.slice_shape, self.kind.in_axes
        return math.prod(s[:n]), math.prod(s[n:])

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """Shape of one HF tensor of it: Linear weights are [out, in], biases flat."""
        if self.kind.hf_flat:
            return (math.prod(self.slice_shape),)
        return self._matrix()[::-1] if self.kind.in_axes else self.slice_shape

    def from_hf(self, w: np.ndarray) -> np.ndarray:
        """One HF tensor -> our layout (of one slice, for stacked kinds)."""
        if self.kind.hf_flat:
            return w.reshape(self.slice_shape)
        return w.T.reshape(self.slice_shape) if self.kind.in_axes else w

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """Our layout (of one slice) -> the HF tensor."""
        if self.kind.hf_flat:
            return x.reshape(-1)
        return x.reshape(self._matrix()).T if self.kind.in_axes else x


def tensors(cfg: ModelConfig, teacher: bool = True) -> Iterator[Tensor]:
    """Every tensor of a model of `cfg`, in a fixed order. `teacher=False` leaves out the original
    q/k/v_proj of layers >= L (the SwiftKV model does not read them)."""
    L, g, n = cfg.num_key_value_layers, cfg.key_value_group_size, cfg.num_layers
    for kind in SCHEMA:
        if not kind.present(cfg):
            continue
        if kind.where == "model":
            yield Tensor(kind, None, kind.path(), kind.shape(cfg), False)
        elif kind.stacked:
            yield Tensor(kind, tuple(range(L, n, g)), kind.path(), kind.shape(cfg), False)
        else:
            for i in kind.layers(cfg):
                upper_teacher = kind.teacher and i >= L
                if upper_teacher and not teacher:
                    continue
                yield Tensor(kind, i, kind.path(i), kind.shape(cfg), upper_teacher)


def kind_name(path: Sequence[Any]) -> str:
    """'layers/*/mlp/gate_proj' for a key path (JAX key entries or plain keys; layer numbers
    folded into '*')."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                k = getattr(k, attr)
                break
        parts.append("*" if isinstance(k, int) or str(k).isdigit() else str(k))
    return "/".join(parts)


def get_path(tree: Any, path: Path) -> Any:
    """tree[path[0]][path[1]]..."""
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: dict, path: Path, value: Any) -> None:
    """Sets tree[path...] = value, creating dicts (and the layers list entries) on the way."""
    for p, nxt in zip(path[:-1], path[1:]):
        if isinstance(tree, list):
            tree = tree[p]
        else:
            tree = tree.setdefault(p, [] if isinstance(nxt, int) else {})
    tree[path[-1]] = value


def empty_weights(cfg: ModelConfig) -> Weights:
    """The skeleton of a weights tree: one empty dict per layer."""
    return {"layers": [{} for _ in range(cfg.num_layers)]}


def abstract_weights(cfg: ModelConfig, dtype: Any = jnp.bfloat16, teacher: bool = False) -> Weights:
    """ShapeDtypeStructs of the weights of `cfg`, with no arrays made (int8.Int8Weight nodes of
    int8 values and float32 scales where cfg.quantization says so). `teacher=False` leaves out the
    original q/k/v_proj of SwiftKV layers >= L (inference does not read them)."""
    w = empty_weights(cfg)
    for t in tensors(cfg, teacher):
        if quantised(t.kind, cfg):
            values, scales = int8.quantised_shapes(t.shape, t.kind.quant_in, cfg.quantization_block)
            leaf = int8.Int8Weight(jax.ShapeDtypeStruct(values, jnp.int8),
                                   jax.ShapeDtypeStruct(scales, jnp.float32), len(t.kind.quant_in))
        else:
            leaf = jax.ShapeDtypeStruct(t.shape, jnp.dtype(dtype))
        set_path(w, t.path, leaf)
    return w


def quantised(kind: TensorKind, cfg: ModelConfig) -> bool:
    """Whether a model of `cfg` stores tensors of `kind` as int8."""
    return bool(cfg.quantization and kind.quant_in)


# -- distillation: the trainable SwiftKV weights and the frozen rest -------------------------------

Trainable = dict[str, Any]  # kind name -> the array (model-level) or the list over its layers


def trainable_of(params: "Params") -> Trainable:
    """The weights the schema marks trainable (SwiftKV: norm_swiftkv, every q_proj_swiftkv, the
    group leaders' k/v_proj), keyed by kind name; per-layer kinds as a list in layer order."""
    if not params.config.swiftkv:
        raise ValueError("these params are a plain Llama (L = N): convert them with to_swiftkv first")
    if params.config.quantization:
        raise ValueError(f"these params are {params.config.quantization}; distil float params "
                         "(params.dequantize(), or load without quantize)")
    out: Trainable = {}
    for t in tensors(params.config):
        if t.kind.trainable:
            x = get_path(params.weights, t.path)
            if t.kind.per_layer:
                out.setdefault(t.kind.name, []).append(x)
            else:
                out[t.kind.name] = x
    return out


def merge(trainable: Trainable, params: "Params") -> "Params":
    """`params` with its trainable weights replaced by `trainable` (other leaves shared, not
    copied), cast to the dtype of the weights they replace (the train state keeps float32 masters)."""
    w = dict(params.weights, layers=[dict(layer) for layer in params.weights["layers"]])
    counters: dict[str, int] = {}
    for t in tensors(params.config):
        if not t.kind.trainable:
            continue
        new = trainable[t.kind.name]
        if t.kind.per_layer:
            j = counters.get(t.kind.name, 0)
            new, counters[t.kind.name] = new[j], j + 1
        # Copy the dicts on the way (nested model-level kinds such as swiftkv/norm/weight).
        node = w
        for p in t.path[:-1]:
            node[p] = (list if isinstance(node[p], list) else dict)(node[p])
            node = node[p]
        node[t.path[-1]] = new.astype(get_path(params.weights, t.path).dtype)
    return Params(w, params.config)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Params:
    """Model weights (a nested dict of arrays, laid out by SCHEMA) plus their static config.

    Layout (`D` hidden, `H`/`K` query/kv heads, `h` head_dim, `F` MLP width, `V` vocab):
      embed_tokens [V, D]; norm {weight [D]}; lm_head [D, V] (absent when tied);
      layers: a list of N per-layer trees, each
        input_layernorm {weight}, q_proj [D, H, h], k_proj/v_proj [D, K, h], o_proj [H, h, D],
        post_attention_layernorm {weight}, mlp {gate_proj, up_proj [D, F], down_proj [F, D]};
        SwiftKV layers >= L add q_proj_swiftkv [D, H, h] (their own q/k/v_proj are kept when
        known: the distillation teacher uses them);
      swiftkv (SwiftKV only): norm {weight [D]}, k_proj/v_proj [G, D, K, h] for the G group leaders,
        stacked so one einsum projects every group.
      Qwen2 adds q_bias [H, h], k_bias/v_bias [K, h] per layer (q_bias_swiftkv on layers >= L,
      swiftkv k_bias/v_bias [G, K, h]); Qwen3 adds q_norm/k_norm {weight [h]} per layer.
    """

    weights: Weights
    config: ModelConfig = dataclasses.field(metadata=dict(static=True))

    @property
    def dtype(self) -> jnp.dtype:
        """The weights' floating-point dtype, the activations' (the KV cache defaults to it)."""
        return self.weights["norm"]["weight"].dtype

    def astype(self, dtype: Any) -> "Params":
        """Casts floating-point weights to `dtype` (e.g. jnp.bfloat16 on GPU/TPU); int8 weights
        and their float32 scales stay as they are."""
        cast = lambda x: (x if isinstance(x, int8.Int8Weight) or not jnp.issubdtype(x.dtype, jnp.floating)
                          else x.astype(dtype))
        return Params(jax.tree.map(cast, self.weights, is_leaf=_is_int8), self.config)

    def quantize(self, scheme: str = "int8", block: int | None = None) -> "Params":
        """The Linear weights (every projection, SwiftKV's, the LM head and the embedding) as int8
        with a float32 scale per `block` inputs (default: the config's quantization_block; 0: one
        per output). Norms and biases stay float."""
        cfg = self.config.replace(quantization=scheme, **({} if block is None else
                                                          {"quantization_block": block}))
        if self.config.quantization:
            raise ValueError(f"these params are already {self.config.quantization}; quantize "
                             "float params (or call dequantize() first)")
        w = jax.tree.map(lambda x: x, self.weights)  # a new tree; leaves shared
        for t in tensors(cfg):
            if quantised(t.kind, cfg):
                x = get_path(w, t.path)
                set_path(w, t.path, _quantise(x, t.kind.quant_in, cfg.quantization_block))
        return Params(w, cfg)

    def dequantize(self) -> "Params":
        """Float params (in the dtype of the float weights) from int8 ones: e.g. to export, or to
        distil from."""
        if not self.config.quantization:
            return self
        w, dtype = jax.tree.map(lambda x: x, self.weights, is_leaf=_is_int8), self.dtype
        for t in tensors(self.config):
            x = get_path(w, t.path)
            if isinstance(x, int8.Int8Weight):
                set_path(w, t.path, _dequantise(x, t.kind.quant_in, dtype))
        return Params(w, self.config.replace(quantization=None))

    def num_parameters(self) -> int:
        """Number of weights (SwiftKV projections and kept original q/k/v included; an int8
        weight's scales not counted)."""
        count = lambda x: np.prod(x.values.shape) if _is_int8(x) else np.prod(x.shape)
        return int(sum(count(x) for x in jax.tree.leaves(self.weights, is_leaf=_is_int8)))

    def nbytes(self) -> int:
        """Bytes of all weights: what batch-1 decode reads per token."""
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.weights)))

    def fingerprint(self, dtype: Any = None) -> str:
        """A short hash of the config and slices of the embedding and the last down_proj: names
        a cache of this model's outputs, or checks a base model. With `dtype` the slices are
        rounded to it first, so e.g. float32 and bfloat16 loads of one model hash alike."""
        h = hashlib.sha1(self.config.identity().encode())
        embed, down = self.weights["embed_tokens"], self.weights["layers"][-1]["mlp"]["down_proj"]
        if isinstance(embed, int8.Int8Weight):  # float slices, in the float model's layout
            embed = _dequantise(embed, KINDS["embed_tokens"].quant_in, jnp.float32)
            down = _dequantise(down, KINDS["layers/*/mlp/down_proj"].quant_in, jnp.float32)
        for x in (embed[:4], down[:4]):
            h.update(np.asarray(x if dtype is None else jnp.asarray(x, dtype)).tobytes())
        return h.hexdigest()[:12]


def _is_int8(x: Any) -> bool:
    return isinstance(x, int8.Int8Weight)


_quantise = jax.jit(int8.quantise, static_argnums=(1, 2))
_dequantise = jax.jit(int8.dequantise, static_argnums=(1, 2))
