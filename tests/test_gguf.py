"""GGUF loading: tiny models written as llama.cpp files, checked against transformers' GGUF loader."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import hf_greedy, hf_logits, make_hf_llama, prompts, rel_err
from gguf_writer import write_gguf

import swiftkv_jax as sk


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0])
def test_qwen2_gguf_matches_transformers_gguf_loader(tmp_path, qtype):
    """A Qwen2 file (architecture qwen2: q/k/v biases, q/k rows not permuted)."""
    torch_model = make_hf_llama(tmp_path / "hf", family="qwen2", num_key_value_heads=2,
                                hidden_size=64, intermediate_size=64)
    path = write_gguf(torch_model, tmp_path / "tiny.gguf", qtype)
    params, _ = sk.load(path, progress=False, tokenizer=False)
    assert params.config.family == "qwen2" and params.config.attention_bias
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32, attn_implementation="eager").eval()
    ids = prompts(params.config.vocab_size, [24], seed=0)
    ours, _ = sk.forward(params, None, jnp.asarray(ids), all_logits=True)
    assert rel_err(ours, hf_logits(ref_model, ids)) <= 1e-4
    if qtype == gguf.GGMLQuantizationType.F32:
        assert rel_err(ours, hf_logits(torch_model, ids)) <= 1e-4


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                                   gguf.GGMLQuantizationType.Q8_0])
@pytest.mark.parametrize("kv_heads,tied", [(2, True), (1, False)])
@pytest.mark.parametrize("source", ["converted", "cached", "no cache"])
def test_gguf_matches_transformers_gguf_loader(tmp_path, monkeypatch, source, qtype, kv_heads, tied):
    """Loaded from the file, again from the dequantised copy the first load kept, and with the
    cache turned off (nothing kept)."""
    cache = tmp_path / "weights"
    monkeypatch.setenv("SWIFTKV_JAX_WEIGHTS_CACHE", "off" if source == "no cache" else str(cache))
    torch_model = make_hf_llama(tmp_path / "hf", num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                                hidden_size=64, intermediate_size=64)
    path = write_gguf(torch_model, tmp_path / "tiny.gguf", qtype)
    params, _ = sk.load(path, progress=False, tokenizer=False)
    kept = list(cache.iterdir()) if cache.exists() else []
    assert len(kept) == (0 if source == "no cache" else 1)  # the converted copy was kept, or not
    if source == "cached":
        params, _ = sk.load(path, progress=False, tokenizer=False)
    assert params.config.num_kv_heads == kv_heads and params.config.tie_word_embeddings == tied
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32, attn_implementation="eager").eval()
    ids = prompts(params.config.vocab_size, [24], seed=0)
    ours, _ = sk.forward(params, None, jnp.asarray(ids), all_logits=True)
    assert rel_err(ours, hf_logits(ref_model, ids)) <= 1e-4
    assert sk.generate(params, None, ids[0], max_new_tokens=32, stop_ids=[])[0] == \
        hf_greedy(ref_model, ids[0], 32)
    if qtype == gguf.GGMLQuantizationType.F32:  # unquantized: equal to the original HF weights too
        assert rel_err(ours, hf_logits(torch_model, ids)) <= 1e-4


@pytest.mark.parametrize("tied", [True, False])
def test_q8_0_gguf_loads_into_int8_as_stored(tmp_path, monkeypatch, tied, float_kernel_path):
    """quantize="int8" takes a Q8_0 file's int8 values and float16 scales as they are: dequantised,
    they equal the gguf package's own dequantisation bit for bit (q/k rows un-permuted alike),
    and the model answers like transformers' GGUF loader (decode on the kernel's float path: the
    VNNI path also rounds activations, tests/test_int8.py checks it against its own reference)."""
    monkeypatch.setenv("SWIFTKV_JAX_WEIGHTS_CACHE", "off")
    torch_model = make_hf_llama(tmp_path / "hf", num_key_value_heads=2, tie_word_embeddings=tied,
                                hidden_size=64, intermediate_size=96)
    path = write_gguf(torch_model, tmp_path / "tiny.gguf", gguf.GGMLQuantizationType.Q8_0)
    floats, _ = sk.load(path, progress=False, tokenizer=False)
    params, _ = sk.load(path, progress=False, tokenizer=False, quantize="int8")
    assert params.config.quantization == "int8" and params.config.quantization_block == 32
    q_proj = params.weights["layers"][1]["q_proj"]
    assert q_proj.values.dtype == jnp.int8 and q_proj.scales.shape == (4, 16, 2)
    for a, b in zip(jax.tree.leaves(params.dequantize().weights), jax.tree.leaves(floats.weights),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32, attn_implementation="eager").eval()
    ids = prompts(params.config.vocab_size, [20], seed=1)
    assert sk.generate(params, None, ids[0], max_new_tokens=16, stop_ids=[])[0] == \
        hf_greedy(ref_model, ids[0], 16)
