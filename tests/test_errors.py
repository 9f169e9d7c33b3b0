"""Bad input gets a clear error from us (naming what is wrong), never a traceback from inside XLA."""

import json

import jax
import pytest
from conftest import make_hf_llama
from safetensors.numpy import load_file, save_file

import swiftkv_jax as sk
from swiftkv_jax.config import ConfigError
from swiftkv_jax.io.weights import WeightsError
from swiftkv_jax.runtime.generation import GenerateError


@pytest.fixture(scope="module")
def params():
    cfg = sk.ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=8, eos_token_ids=(2,))
    return sk.init_params(cfg, jax.random.PRNGKey(0))


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sk.load("/no/such/model")


def test_folder_without_weights(tmp_path, params):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        sk.load(tmp_path / "empty")
    (tmp_path / "config.json").write_text(json.dumps(params.config.to_hf_dict()))
    with pytest.raises(WeightsError, match="no .*safetensors"):
        sk.load(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="not a .gguf"):
        sk.load(tmp_path / "weights.bin")
    (tmp_path / "broken.gguf").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="not a readable GGUF"):
        sk.load(tmp_path / "broken.gguf")


@pytest.fixture
def hf_folder(tmp_path):
    make_hf_llama(tmp_path, num_hidden_layers=2)
    return tmp_path


def _edit_weights(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_tensor_is_named(hf_folder):
    _edit_weights(hf_folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        sk.load(hf_folder)


def test_misshaped_tensor_is_named(hf_folder):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1]
    _edit_weights(hf_folder, shrink)
    with pytest.raises(WeightsError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*shape"):
        sk.load(hf_folder)


@pytest.mark.parametrize("change,field", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
    ({"model_type": "qwen3", "attention_bias": True}, "attention_bias"),
    ({"model_type": "qwen3_swiftkv"}, "model_type"),
    ({"model_type": "qwen2_moe"}, "model_type"),
])
def test_unsupported_config_names_the_field(hf_folder, change, field):
    cfg = json.loads((hf_folder / "config.json").read_text())
    cfg.update(change)
    cfg.pop("rope_parameters", None) if "rope_scaling" in change else None
    (hf_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=field):
        sk.load(hf_folder)


def test_swiftkv_of_a_qwen3_is_refused_by_name():
    cfg = sk.ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=4, family="qwen3")
    with pytest.raises(ConfigError, match="not defined for the qwen3 family"):
        sk.to_swiftkv(sk.init_params(cfg, jax.random.PRNGKey(0)), 1)


def test_gpt2_config_from_transformers_is_refused():
    from transformers import GPT2Config
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        sk.ModelConfig.from_hf_dict(GPT2Config().to_dict())


@pytest.mark.parametrize("prompt,kwargs,message", [
    ([], {}, "empty"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([1, 2, 50], {}, "outside the vocabulary"),
    ([1, -3], {}, "outside the vocabulary"),
    ([1] * 60, {}, "cache holds 64"),
    ([1, 2], {"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ([1, 2], {"temperature": -1.0}, "temperature"),
    ([1, 2], {"top_p": 0.0}, "top_p"),
    ([1, 2], {"top_k": -2}, "top_k"),
    ("hello", {}, "token ids"),
    ([[1, 2]] * 3, {}, "3 prompts but the cache holds 2 rows"),
])
def test_bad_generate_requests(params, prompt, kwargs, message):
    cache = sk.init_cache(params, 2, 64)
    kwargs.setdefault("max_new_tokens", 8)
    with pytest.raises(GenerateError, match=message):
        sk.generate(params, cache, prompt, **kwargs)


def test_tokenizer_output_is_read_as_its_input_ids(params):
    """transformers 5's apply_chat_template returns a BatchEncoding, not a list of ids."""
    want, _ = sk.generate(params, None, [1, 2, 3], max_new_tokens=4)
    got, _ = sk.generate(params, None, {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]},
                         max_new_tokens=4)
    assert got == want


def test_bad_swiftkv_layers_in_config():
    base = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=4, num_heads=2,
                num_kv_heads=1, head_dim=8)
    with pytest.raises(ConfigError, match="num_key_value_layers"):
        sk.ModelConfig(**base, num_key_value_layers=0)
    with pytest.raises(ConfigError, match="key_value_group_size"):
        sk.ModelConfig(**base, num_key_value_layers=1, key_value_group_size=2)


def test_reusing_a_donated_cache_is_a_clear_error(params):
    cache = sk.init_cache(params, 1, 32)
    _, new_cache = sk.generate(params, cache, [1, 2, 3], max_new_tokens=2)
    with pytest.raises(GenerateError, match="donated to an earlier generate"):
        sk.generate(params, cache, [1, 2, 3], max_new_tokens=2)
    sk.generate(params, new_cache, [1, 2, 3], max_new_tokens=2)  # the returned one works
