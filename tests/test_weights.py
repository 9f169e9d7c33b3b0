"""Weight formats: sharded and bf16 safetensors, our orbax checkpoints, HF export read by transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import hf_logits, make_hf_llama, prompts, rel_err

import swiftkv_jax as sk
from swiftkv_jax.config import ModelConfig


def _same_params(a: sk.Params, b: sk.Params) -> bool:
    return a.config == b.config and jax.tree.structure(a.weights) == jax.tree.structure(b.weights) \
        and all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights)))


def test_sharded_safetensors_with_index(tmp_path):
    model = make_hf_llama(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    one, _ = sk.load(tmp_path / "one", progress=False)
    sharded, _ = sk.load(tmp_path / "sharded", progress=False)
    assert _same_params(one, sharded)


def test_bf16_safetensors(tmp_path):
    model = make_hf_llama(tmp_path / "f32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    params, _ = sk.load(tmp_path / "bf16", dtype=jnp.float32, progress=False)
    ids = prompts(params.config.vocab_size, [16])
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(  # bf16 weights, f32 compute
        tmp_path / "bf16", dtype=torch.float32, attn_implementation="eager").eval()
    ref = hf_logits(ref_model, ids)
    ours, _ = sk.forward(params, None, jnp.asarray(ids), all_logits=True)
    assert rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_orbax_checkpoint_round_trip_is_bit_identical(tmp_path, request, family):
    folder, _ = request.getfixturevalue("gqa_model" if family == "llama" else "qwen2_model")
    params, _ = sk.load(folder, progress=False)
    sk.save_checkpoint(params, tmp_path / "ckpt")
    restored, _ = sk.load(tmp_path / "ckpt")
    assert _same_params(params, restored)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored.weights))
    # Saving again over an existing folder replaces it atomically (no leftovers beside it).
    sk.save_checkpoint(params, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_exported_hf_folder_loads_in_transformers(tmp_path, request, family):
    folder, hf = request.getfixturevalue("gqa_model" if family == "llama" else "qwen2_model")
    params, _ = sk.load(folder, progress=False)
    sk.save_hf_folder(params, tmp_path / "export")
    again, _ = sk.load(tmp_path / "export", progress=False)
    assert _same_params(params, again)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "export", dtype=torch.float32, attn_implementation="eager").eval()
    ids = prompts(params.config.vocab_size, [12])
    assert rel_err(hf_logits(reloaded, ids), hf_logits(hf, ids)) <= 1e-6


def test_config_reads_transformers_4_and_5_layouts():
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=2, num_attention_heads=2, eos_token_id=[3, 4])
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    v4 = ModelConfig.from_hf_dict(dict(base, rope_theta=5e5, rope_scaling=scaling))
    v5 = ModelConfig.from_hf_dict(dict(base, rope_parameters=dict(scaling, rope_theta=5e5)))
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.rope_scaling.factor == 8.0
    assert v4.eos_token_ids == (3, 4) and v4.num_kv_heads == 2 and v4.head_dim == 4
    assert ModelConfig.from_hf_dict(v4.to_hf_dict()) == v4
    assert hash(v4) == hash(v5)  # static under jit
