"""Params: the weights pytree together with the static ModelConfig that describes it.

Because the config is static pytree metadata, `generate(params, cache, prompt)` and every jitted
function read the model's shape from `params` alone, and a new config means a new compilation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig

Weights = dict[str, Any]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Params:
    """Model weights (a nested dict of arrays) plus their static config.

    Layout (`D` hidden, `H`/`K` query/kv heads, `h` head_dim, `F` MLP width, `V` vocab):
      embed_tokens [V, D]; norm {weight [D]}; lm_head [D, V] (absent when tied);
      layers: a list of N per-layer trees, each
        input_layernorm {weight}, q_proj [D, H, h], k_proj/v_proj [D, K, h], o_proj [H, h, D],
        post_attention_layernorm {weight}, mlp {gate_proj, up_proj [D, F], down_proj [F, D]};
        SwiftKV layers >= L add q_proj_swiftkv [D, H, h] (their own q/k/v_proj are kept when
        known: the distillation teacher uses them);
      swiftkv (SwiftKV only): norm {weight [D]}, k_proj/v_proj [G, D, K, h] for the G group leaders,
        stacked so one einsum projects every group.
    """

    weights: Weights
    config: ModelConfig = dataclasses.field(metadata=dict(static=True))

    @property
    def dtype(self) -> jnp.dtype:
        """The weights' floating-point dtype (the KV cache defaults to it)."""
        return self.weights["embed_tokens"].dtype

    def astype(self, dtype: Any) -> "Params":
        """Casts floating-point weights to `dtype` (e.g. jnp.bfloat16 on GPU/TPU)."""
        cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        return Params(jax.tree.map(cast, self.weights), self.config)

    def num_parameters(self) -> int:
        """Number of weights (SwiftKV projections and kept original q/k/v included)."""
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.weights)))

    def nbytes(self) -> int:
        """Bytes of all weights: what batch-1 decode reads per token."""
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.weights)))
