"""The weights schema (swiftkv_jax/model/params.py) against independent references: the tensor names
and shapes that transformers itself saves for a Llama, and that the SwiftKV reference (written
from SWIFTKV.md's checkpoint format) saves for a llama_swiftkv model. A wrong shape, axis or name
in the schema turns these red before any logits are computed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from conftest import TINY_CONFIGS, make_hf_llama
from safetensors.numpy import load_file
from swiftkv_reference import SwiftKVReference

import swiftkv_jax as sk
from swiftkv_jax.model.params import abstract_weights, tensors


def _hf_names_and_shapes(config: sk.ModelConfig, teacher: bool = True) -> dict[str, tuple]:
    return {name: t.hf_shape for t in tensors(config, teacher) for name in t.hf_names}


def _file_names_and_shapes(folder) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in load_file(folder / "model.safetensors").items()}


@pytest.mark.parametrize("name", ["gqa_tied", "mha_untied", "head_dim_24", "qwen2_gqa_tied",
                                  "qwen2_mqa_head_dim_24", "qwen3_gqa"])
def test_schema_is_what_transformers_saves(tmp_path, name):
    model = make_hf_llama(tmp_path, **TINY_CONFIGS[name])
    config = sk.ModelConfig.from_json_file(tmp_path / "config.json")
    saved = {k: tuple(v.shape) for k, v in model.state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}
    assert _hf_names_and_shapes(config) == saved


@pytest.mark.parametrize("group_size", [1, 2])
def test_schema_is_the_llama_swiftkv_format(tmp_path, group_size):
    base = make_hf_llama(tmp_path / "base", num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2)
    ref = SwiftKVReference(base, num_key_value_layers=2, group_size=group_size)
    ref.save_llama_swiftkv(tmp_path / "swiftkv", with_original_qkv=True)
    config = sk.ModelConfig.from_json_file(tmp_path / "swiftkv" / "config.json")
    saved = _file_names_and_shapes(tmp_path / "swiftkv")
    assert _hf_names_and_shapes(config) == saved
    # Without the teacher's tensors: the original q/k/v of layers >= L are left out, nothing else.
    upper_qkv = {f"model.layers.{l}.self_attn.{p}_proj.weight" for l in (2, 3) for p in "qkv"}
    assert _hf_names_and_shapes(config, teacher=False).keys() == saved.keys() - upper_qkv


@pytest.mark.parametrize("swiftkv", [False, True], ids=["plain", "swiftkv"])
def test_abstract_weights_match_init_params(swiftkv):
    config = sk.ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=4,
                            num_heads=4, num_kv_heads=2, head_dim=8,
                            num_key_value_layers=2 if swiftkv else None, key_value_group_size=2)
    made = jax.eval_shape(lambda: sk.init_params(config, jax.random.PRNGKey(0)).weights)
    abstract = abstract_weights(config, jnp.float32, teacher=True)
    assert jax.tree.structure(made) == jax.tree.structure(abstract)
    pairs = list(zip(jax.tree.leaves(made), jax.tree.leaves(abstract)))
    assert pairs and all(a.shape == b.shape and a.dtype == b.dtype for a, b in pairs)
    assert ("swiftkv" in made) == swiftkv
