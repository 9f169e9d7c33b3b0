"""ModelConfig: the static description of a (SwiftKV) Llama, Qwen2 or Qwen3 model.

The families differ in a few schema entries (params.SCHEMA) the config's `family` switches on:
Qwen2 has biases on its q/k/v projections (`attention_bias`), Qwen3 RMS-normalises each head of q
and k before RoPE (`qk_norm`); everything else is the Llama computation.

Frozen and hashable so it can travel inside pytrees as static metadata and key jit caches.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping

FAMILIES = ("llama", "qwen2", "qwen3")
SUPPORTED_MODEL_TYPES = ("llama", "llama_swiftkv", "qwen2", "qwen2_swiftkv", "qwen3")
# Hugging Face `architectures` of each family, plain and SwiftKV (Snowflake's names).
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "LlamaSwiftKVForCausalLM"),
                 "qwen2": ("Qwen2ForCausalLM", "Qwen2SwiftKVForCausalLM"),
                 "qwen3": ("Qwen3ForCausalLM", None)}
SUPPORTED_ROPE_TYPES = ("default", "llama3")


# Fields added after configs were first fingerprinted (see ModelConfig.identity).
LATER_FIELDS = ("family", "quantization", "quantization_block")
QUANTIZATIONS = ("int8",)
OUR_QUANT_METHOD = {"int8": "swiftkv_jax_int8"}  # config.json quantization_config.quant_method


class ConfigError(ValueError):
    """A model configuration this library cannot run; the message names the field."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a (SwiftKV) Llama model.

    `num_key_value_layers` (L) and `key_value_group_size` (g) describe SwiftKV: layers >= L take
    their K/V from layer L's input (SingleInputKV), shared by groups of g layers (AcrossKV).
    L = num_layers is the plain Llama.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    num_key_value_layers: int | None = None  # None -> num_layers (SwiftKV off)
    key_value_group_size: int = 1
    family: str = "llama"  # "llama", "qwen2" or "qwen3": its schema entries, its model_type on export
    quantization: str | None = None  # "int8": the Linear weights stored as int8 (model/int8.py)
    quantization_block: int = 32  # inputs per int8 scale; 0 (or a size that does not divide): per output

    def __post_init__(self) -> None:
        if self.num_key_value_layers is None:
            object.__setattr__(self, "num_key_value_layers", self.num_layers)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.family not in FAMILIES:
            raise ConfigError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ConfigError(f"quantization must be one of {QUANTIZATIONS} (or None for float "
                              f"weights), got {self.quantization!r}")
        if int(self.quantization_block) < 0:
            raise ConfigError(f"quantization_block must be >= 0 (0: one scale per output), got "
                              f"{self.quantization_block!r}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        L, N, g = self.num_key_value_layers, self.num_layers, self.key_value_group_size
        if not 1 <= L <= N:
            raise ConfigError(f"num_key_value_layers must be in [1, {N}] (num_hidden_layers), got {L}")
        if g < 1 or (N - L) % g:
            raise ConfigError(
                f"key_value_group_size ({g}) must divide num_hidden_layers - num_key_value_layers "
                f"({N} - {L} = {N - L})")
        if L < N and ARCHITECTURES[self.family][1] is None:
            raise ConfigError(f"SwiftKV is not defined for the {self.family} family (no "
                              f"{self.family}_swiftkv format); Llama and Qwen2 models can be converted")

    # -- derived quantities ---------------------------------------------------------------
    @property
    def attention_bias(self) -> bool:
        """The q/k/v projections (and SwiftKV's) have biases: Qwen2."""
        return self.family == "qwen2"

    @property
    def qk_norm(self) -> bool:
        """Each head of q and k is RMS-normalised before RoPE: Qwen3."""
        return self.family == "qwen3"

    @property
    def swiftkv(self) -> bool:
        """True when some layers take their K/V from layer L's input."""
        return self.num_key_value_layers < self.num_layers

    @property
    def num_upper_layers(self) -> int:
        """N - L: the layers whose K/V come from layer L's input."""
        return self.num_layers - self.num_key_value_layers

    @property
    def num_kv_groups(self) -> int:
        """Number of K/V groups above layer L (AcrossKV leaders)."""
        return self.num_upper_layers // self.key_value_group_size

    @property
    def num_cache_layers(self) -> int:
        """KV-cache layer slots: L + (N - L) / g."""
        return self.num_key_value_layers + self.num_kv_groups

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """KV bytes one token occupies: keys and values of every cache layer slot."""
        return 2 * self.num_cache_layers * self.num_kv_heads * self.head_dim * itemsize

    def identity(self) -> str:
        """The config as a stable string: the dataclass repr, leaving out fields added later
        (LATER_FIELDS) while they are at their defaults, so the fingerprints that name caches and
        check shipped models (made before those fields existed) stay what they were."""
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                 if not (f.name in LATER_FIELDS and getattr(self, f.name) == f.default)]
        return f"ModelConfig({', '.join(parts)})"

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes` applied (and validated again): the config is frozen."""
        return dataclasses.replace(self, **changes)

    # -- Hugging Face config.json ---------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Reads a Hugging Face `config.json` dict (model_type llama or llama_swiftkv)."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported; this library runs Llama, Qwen2 and "
                f"Qwen3 models (model_type one of {SUPPORTED_MODEL_TYPES})")
        family = model_type.removesuffix("_swiftkv")
        if family == "llama":
            for flag in ("attention_bias", "mlp_bias"):
                if d.get(flag):
                    raise ConfigError(f"{flag}=true is not supported for Llama (its o_proj / MLP "
                                      "biases are not implemented; Qwen2's q/k/v biases are)")
        elif family == "qwen3" and d.get("attention_bias"):
            raise ConfigError("attention_bias=true is not supported for Qwen3 (o_proj biases are "
                              "not implemented)")
        if d.get("use_sliding_window"):
            raise ConfigError("use_sliding_window=true is not supported (sliding-window attention "
                              "is not implemented); set it to false to run with full attention")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported (only 'silu', SwiGLU MLP)")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError("pretraining_tp != 1 is not supported")
        try:
            hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
            rope = _rope_from_hf(d)
            eos = d.get("eos_token_id")
            eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos])
                            if e is not None)
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope[0],
                rope_scaling=rope[1],
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
                num_key_value_layers=d.get("num_key_value_layers"),
                key_value_group_size=int(d.get("key_value_group_size") or 1),
                family=family,
                **_quantization_fields(d.get("quantization_config")),
            )
        except KeyError as e:
            raise ConfigError(f"config.json is missing the required field {e.args[0]!r}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face `config.json` dict of the model's family; `<family>_swiftkv` (with
        Snowflake's fields) when SwiftKV is on."""
        plain, swift = ARCHITECTURES[self.family]
        d: dict[str, Any] = {
            "architectures": [plain],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else {
                "rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": False,
            "use_sliding_window": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) != 1
                             else self.eos_token_ids[0]),
        }
        if self.swiftkv:
            d.update(architectures=[swift], model_type=f"{self.family}_swiftkv",
                     swiftkv=True, num_key_value_layers=self.num_key_value_layers,
                     key_value_group_size=self.key_value_group_size)
        if self.quantization:  # only our own checkpoints hold int8 weights (HF exports are float)
            d["quantization_config"] = {"quant_method": OUR_QUANT_METHOD[self.quantization],
                                        "block_size": self.quantization_block}
        return d

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        """Reads a Hugging Face `config.json` file (see from_hf_dict)."""
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d)

    # -- GGUF metadata ----------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], vocab_size: int,
                           tie_word_embeddings: bool) -> "ModelConfig":
        """Reads llama.cpp GGUF metadata (`general.architecture` llama, qwen2 or qwen3; the
        fields are named after it, e.g. qwen2.block_count)."""
        arch = meta.get("general.architecture")
        if arch not in FAMILIES:
            raise ConfigError(f"GGUF general.architecture {arch!r} is not supported (one of {FAMILIES})")
        key = lambda name: f"{arch}.{name}"
        try:
            heads = int(meta[key("attention.head_count")])
            hidden = int(meta[key("embedding_length")])
            head_dim = int(meta.get(key("attention.key_length")) or
                           meta.get(key("rope.dimension_count")) or hidden // heads)
            if meta.get(key("rope.scaling.type")) not in (None, "none"):
                raise ConfigError(
                    f"GGUF {key('rope.scaling.type')} {meta[key('rope.scaling.type')]!r} is not supported")
            eos = meta.get("tokenizer.ggml.eos_token_id")
            return cls(
                vocab_size=vocab_size,
                hidden_size=hidden,
                intermediate_size=int(meta[key("feed_forward_length")]),
                num_layers=int(meta[key("block_count")]),
                num_heads=heads,
                num_kv_heads=int(meta.get(key("attention.head_count_kv")) or heads),
                head_dim=head_dim,
                rms_norm_eps=float(meta.get(key("attention.layer_norm_rms_epsilon"), 1e-5)),
                rope_theta=float(meta.get(key("rope.freq_base"), 10000.0)),
                max_position_embeddings=int(meta.get(key("context_length"), 2048)),
                tie_word_embeddings=tie_word_embeddings,
                bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                eos_token_ids=() if eos is None else (int(eos),),
                family=arch,
            )
        except KeyError as e:
            raise ConfigError(f"GGUF metadata is missing the required field {e.args[0]!r}") from None


def _rope_from_hf(d: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either transformers-4 (`rope_scaling`) or -5 (`rope_parameters`)."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or None
    theta = float(d.get("rope_theta") or params.get("rope_theta") or 10000.0)
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is None:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope_scaling.rope_type {rope_type!r} is not supported (one of {SUPPORTED_ROPE_TYPES})")
    if rope_type == "default":
        return theta, None
    try:
        return theta, RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"rope_scaling is missing the field {e.args[0]!r}") from None


def rope_inverse_frequencies(cfg: ModelConfig) -> "list[float]":
    """RoPE inverse frequencies (length head_dim/2), with Llama-3 scaling applied if configured."""
    dim = cfg.head_dim
    inv = [1.0 / (cfg.rope_theta ** (i / dim)) for i in range(0, dim, 2)]
    s = cfg.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return out


def _quantization_fields(qc: Mapping[str, Any] | None) -> dict[str, Any]:
    """ModelConfig fields from a config.json `quantization_config` (only ours is understood)."""
    if not qc:
        return {}
    ours = {v: k for k, v in OUR_QUANT_METHOD.items()}
    method = qc.get("quant_method")
    if method not in ours:
        raise ConfigError(f"quantization_config quant_method {method!r} is not supported (weights "
                          f"quantised by other tools are not read); give float weights and "
                          f"quantize='int8' instead")
    return {"quantization": ours[method], "quantization_block": int(qc.get("block_size", 32))}


def check_quantization(scheme: str | None) -> None:
    """A clear error for an unknown quantization name (before any weights are read)."""
    if scheme not in (None, *QUANTIZATIONS):
        raise ConfigError(f"quantize must be one of {QUANTIZATIONS} or None (float weights), got "
                          f"{scheme!r}")
