"""SwiftKV: our prefill-skipping path against an independent PyTorch reference; checkpoint format;
initialisation rules; bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_logits, make_hf_llama, prompts, rel_err
from safetensors.numpy import load_file, save_file
from swiftkv_reference import SwiftKVReference

import swiftkv_jax as sk
from swiftkv_jax.config import ConfigError
from swiftkv_jax.io.weights import WeightsError
from swiftkv_jax.model.forward import lower_hidden, upper_logits

N = 6  # layers of the tiny model: L = 2 leaves 4 upper layers, so g = 1, 2 and 4 all fit


@pytest.fixture(scope="module", params=[("llama", 1), ("llama", 2), ("llama", 4), ("qwen2", 1), ("qwen2", 2)],
                ids=lambda p: f"{p[0]}_g{p[1]}")
def swiftkv_pair(request, tmp_path_factory):
    """(our params, torch reference) for a tiny GQA Llama or Qwen2 with L = 2 and group size g."""
    family, g = request.param
    folder = tmp_path_factory.mktemp(f"swiftkv_{family}_g{g}")
    base = make_hf_llama(folder / "base", family=family, num_hidden_layers=N, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=(g == 2))
    ref = SwiftKVReference(base, num_key_value_layers=2, group_size=g, seed=g)
    ref.save_llama_swiftkv(folder / "swiftkv", with_original_qkv=(g != 4))
    params, _ = sk.load(folder / "swiftkv", progress=False)
    return params, ref


def test_config_read_from_llama_swiftkv(swiftkv_pair):
    params, ref = swiftkv_pair
    cfg = params.config
    assert cfg.swiftkv and cfg.num_key_value_layers == 2 and cfg.key_value_group_size == ref.g
    assert cfg.num_cache_layers == 2 + 4 // ref.g


def test_prefill_last_token_logits_match_reference(swiftkv_pair):
    params, ref = swiftkv_pair
    batch = prompts(params.config.vocab_size, [23, 7, 40], seed=1)
    cache = sk.init_cache(params, 3, 64)
    tokens = np.zeros((3, 40), np.int32)
    for i, p in enumerate(batch):
        tokens[i, :len(p)] = p
    logits, cache = sk.forward(params, cache, jnp.asarray(tokens), jnp.asarray([23, 7, 40]))
    for i, p in enumerate(batch):
        assert rel_err(logits[i], ref(torch.tensor([p]))[0, -1].numpy()) <= 1e-4


def test_all_positions_match_reference_without_cache(swiftkv_pair):
    params, ref = swiftkv_pair
    ids = prompts(params.config.vocab_size, [30], seed=2)
    ours, _ = sk.forward(params, None, jnp.asarray(ids), all_logits=True)
    assert rel_err(ours, ref(torch.tensor(ids)).numpy()) <= 1e-4


def test_greedy_continuation_matches_reference(swiftkv_pair):
    """Prefill skips layers >= L; every decode step runs all layers with its own upper K/V."""
    params, ref = swiftkv_pair
    batch = prompts(params.config.vocab_size, [5, 19, 12], seed=3)
    ours, _ = sk.generate(params, None, batch, max_new_tokens=24, stop_ids=[])
    assert ours == [ref.greedy(p, 24) for p in batch]


def test_cache_has_swiftkv_slots_and_bytes(swiftkv_pair):
    params, ref = swiftkv_pair
    cache = sk.init_cache(params, 2, 32)
    base_cache = sk.init_cache(sk.init_params(params.config.replace(num_key_value_layers=N,
                                                                    key_value_group_size=1),
                                              jax.random.PRNGKey(0)), 2, 32)
    assert len(cache.k) == 2 + (N - 2) // ref.g
    assert cache.bytes_per_token() * N == base_cache.bytes_per_token() * (2 + (N - 2) // ref.g)


def test_export_then_import_is_bit_identical_with_exact_names(swiftkv_pair, tmp_path):
    params, ref = swiftkv_pair
    sk.save_hf_folder(params, tmp_path / "out")
    again, _ = sk.load(tmp_path / "out", progress=False)
    assert again.config == params.config
    for a, b in zip(jax.tree.leaves(params.weights), jax.tree.leaves(again.weights)):
        assert np.array_equal(a, b)
    names = set(load_file(tmp_path / "out" / "model.safetensors"))
    L, g = 2, ref.g
    parts = ("weight", "bias") if ref.biased else ("weight",)
    expected_swift = {"model.norm_swiftkv.weight"} | {
        f"model.layers.{l}.self_attn.q_proj_swiftkv.{part}" for l in range(L, N) for part in parts} | {
        f"model.layers.{l}.self_attn.{p}_swiftkv.{part}" for l in range(L, N, g) for p in ("k_proj", "v_proj")
        for part in parts}
    assert {n for n in names if "swiftkv" in n} == expected_swift
    has_qkv = g != 4  # the g=4 checkpoint was written without the upper layers' original q/k/v
    assert ("model.layers.5.self_attn.k_proj.weight" in names) == has_qkv
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    family, arch = ("qwen2", "Qwen2") if ref.biased else ("llama", "Llama")
    assert cfg["model_type"] == f"{family}_swiftkv" and cfg["architectures"] == [f"{arch}SwiftKVForCausalLM"]
    assert (cfg["num_key_value_layers"], cfg["key_value_group_size"], cfg["swiftkv"]) == (L, g, True)
    # The reference reads our export back (its own loader, Hugging Face names): the same model.
    reread = SwiftKVReference(ref.base, L, g, seed=99)
    reread.load_swiftkv_tensors(tmp_path / "out" / "model.safetensors")
    ids = torch.tensor(prompts(params.config.vocab_size, [12], seed=6))
    assert rel_err(reread(ids).numpy(), ref(ids).numpy()) <= 1e-6


def test_num_key_value_layers_equal_n_is_the_plain_model(gqa_model):
    folder, _ = gqa_model
    params, _ = sk.load(folder, progress=False)
    same = sk.to_swiftkv(params, params.config.num_layers)
    assert not same.config.swiftkv and "swiftkv" not in same.weights
    ids = jnp.asarray(prompts(params.config.vocab_size, [17], seed=4))
    a, _ = sk.forward(params, None, ids, all_logits=True)
    b, _ = sk.forward(same, None, ids, all_logits=True)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_initialisation_rules_on_the_tensors(tmp_path, family):
    make_hf_llama(tmp_path, family=family, num_attention_heads=4, num_key_value_heads=2)
    base, _ = sk.load(tmp_path, progress=False)
    n = base.config.num_layers
    sw = sk.to_swiftkv(base, n - 1, 1)
    top, w = base.weights["layers"][n - 1], sw.weights
    assert np.array_equal(w["layers"][n - 1]["q_proj_swiftkv"], top["q_proj"])
    assert np.array_equal(w["swiftkv"]["k_proj"][0], top["k_proj"])
    assert np.array_equal(w["swiftkv"]["v_proj"][0], top["v_proj"])
    if family == "qwen2":
        assert np.array_equal(w["layers"][n - 1]["q_bias_swiftkv"], top["q_bias"])
        assert np.array_equal(w["swiftkv"]["k_bias"][0], top["k_bias"])
        assert np.array_equal(w["swiftkv"]["v_bias"][0], top["v_bias"])
    assert np.array_equal(w["swiftkv"]["norm"]["weight"], top["input_layernorm"]["weight"])
    for a, b in zip(jax.tree.leaves(base.weights["layers"][:n - 1]), jax.tree.leaves(w["layers"][:n - 1])):
        assert np.array_equal(a, b)
    # With L = N - 1 the only upper layer's K/V input is norm_swiftkv(h_L) = its own input norm:
    # the initialised model computes the base model.
    ids = jnp.asarray(prompts(base.config.vocab_size, [20], seed=5))
    a, _ = sk.forward(base, None, ids, all_logits=True)
    b, _ = sk.forward(sw, None, ids, all_logits=True)
    assert rel_err(b, a) <= 1e-6
    # The teacher view of SwiftKV params is the base model exactly.
    c, _ = upper_logits(sw, lower_hidden(sw, ids), use_swiftkv=False)
    assert np.array_equal(a, c)
    d, _ = sk.forward(sk.swiftkv_off(sw), None, ids, all_logits=True)
    assert np.array_equal(a, d)


def test_group_initialisation_is_the_mean_of_the_group(gqa_model):
    folder, _ = gqa_model
    base, _ = sk.load(folder, progress=False)  # 3 layers: L = 1, g = 2
    sw = sk.to_swiftkv(base, 1, 2)
    layers = base.weights["layers"]
    np.testing.assert_allclose(sw.weights["swiftkv"]["k_proj"][0],
                               (layers[1]["k_proj"] + layers[2]["k_proj"]) / 2, rtol=1e-6)


def test_group_initialisation_of_qwen2_biases_is_the_mean(tmp_path):
    make_hf_llama(tmp_path, family="qwen2")
    base, _ = sk.load(tmp_path, progress=False)  # 3 layers: L = 1, g = 2
    sw, layers = sk.to_swiftkv(base, 1, 2), base.weights["layers"]
    for name in ("k_bias", "v_bias"):
        np.testing.assert_allclose(sw.weights["swiftkv"][name][0], (layers[1][name] + layers[2][name]) / 2,
                                   rtol=1e-6)


def test_bad_layers_and_groups_are_refused(gqa_model):
    folder, _ = gqa_model
    base, _ = sk.load(folder, progress=False)
    with pytest.raises(ConfigError, match=r"num_key_value_layers must be in \[1, 3\]"):
        sk.to_swiftkv(base, 4)
    with pytest.raises(ConfigError, match="key_value_group_size"):
        sk.to_swiftkv(base, 1, 3)
    with pytest.raises(ConfigError, match="already SwiftKV"):
        sk.to_swiftkv(sk.to_swiftkv(base, 1), 1)


@pytest.fixture
def swiftkv_folder(tmp_path):
    base = make_hf_llama(tmp_path / "base", num_hidden_layers=4)
    SwiftKVReference(base, 2, 2).save_llama_swiftkv(tmp_path / "sw")
    return tmp_path / "sw"


def test_missing_swiftkv_tensor_is_named(swiftkv_folder):
    tensors = load_file(swiftkv_folder / "model.safetensors")
    del tensors["model.layers.2.self_attn.v_proj_swiftkv.weight"]
    save_file(tensors, swiftkv_folder / "model.safetensors")
    with pytest.raises(WeightsError, match=r"model\.layers\.2\.self_attn\.v_proj_swiftkv\.weight.*missing"):
        sk.load(swiftkv_folder)


def test_swiftkv_tensor_with_wrong_shape_is_named(swiftkv_folder):
    tensors = load_file(swiftkv_folder / "model.safetensors")
    tensors["model.layers.3.self_attn.q_proj_swiftkv.weight"] = tensors[
        "model.layers.3.self_attn.q_proj_swiftkv.weight"][:, :-1].copy()
    save_file(tensors, swiftkv_folder / "model.safetensors")
    with pytest.raises(WeightsError, match=r"q_proj_swiftkv\.weight.*shape"):
        sk.load(swiftkv_folder)


def test_inconsistent_layers_in_swiftkv_config(swiftkv_folder):
    cfg = json.loads((swiftkv_folder / "config.json").read_text())
    cfg["key_value_group_size"] = 3
    (swiftkv_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="key_value_group_size"):
        sk.load(swiftkv_folder)


def test_teacher_and_student_from_shared_lower_layers(swiftkv_pair):
    """Distillation's split: layers [0, L) once, then the upper layers as student and as teacher."""
    params, ref = swiftkv_pair
    ids = jnp.asarray(prompts(params.config.vocab_size, [21], seed=9))
    h_l = lower_hidden(params, ids)
    student, into_last = upper_logits(params, h_l)
    assert rel_err(student, ref(torch.tensor(np.asarray(ids))).numpy()) <= 1e-4
    assert into_last.shape == h_l.shape
    if ref.g != 4:  # that checkpoint has no original q/k/v for the upper layers
        teacher, _ = upper_logits(params, h_l, use_swiftkv=False)
        assert rel_err(teacher, hf_logits(ref.base, np.asarray(ids).tolist())) <= 1e-4
