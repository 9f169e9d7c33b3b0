"""End-to-end on the real SmolLM2-135M-Instruct GGUF: ours against transformers loading the same file."""

import functools

import jax.numpy as jnp
import pytest
import torch
import transformers
from conftest import hf_greedy, hf_logits, rel_err

import swiftkv_jax as sk

pytestmark = pytest.mark.real_model

QUESTIONS = ["What is the capital of France?",
             "Write a haiku about the sea.",
             "Explain in two sentences why the sky is blue."]


@functools.lru_cache(maxsize=1)
def models():
    try:
        path = sk.default_model_path()
    except FileNotFoundError as e:
        pytest.fail(f"{e} (the README's test command installs it)")
    params, tokenizer = sk.load(path, progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return params, tokenizer, ref


def chat_ids(tokenizer, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                        add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_config_read_from_gguf():
    params, tokenizer, ref = models()
    cfg = params.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.vocab_size == ref.config.vocab_size
    assert cfg.eos_token_ids == (tokenizer.eos_token_id,)


def test_logits_match_transformers():
    params, tokenizer, ref = models()
    ids = chat_ids(tokenizer, QUESTIONS[0])
    ours, _ = sk.forward(params, None, jnp.asarray([ids]), all_logits=True)
    assert rel_err(ours, hf_logits(ref, [ids])) <= 1e-4


@pytest.mark.parametrize("question", QUESTIONS)
def test_greedy_answers_match_transformers(question):
    params, tokenizer, ref = models()
    ids = chat_ids(tokenizer, question)
    ours, _ = sk.generate(params, None, ids, max_new_tokens=40, stop_ids=[])
    assert ours == hf_greedy(ref, ids, 40)


def test_answer_is_real_text():
    params, tokenizer, _ = models()
    ids, _ = sk.generate(params, None, chat_ids(tokenizer, QUESTIONS[0]), max_new_tokens=30)
    assert "Paris" in tokenizer.decode(ids)


def test_tokenizer_without_torch_equals_transformers_gguf_tokenizer():
    """The main job builds the GGUF tokenizer from metadata (no torch); it must encode like
    transformers' own GGUF tokenizer."""
    from swiftkv_jax.io.gguf import tokenizer_from_gguf_metadata
    path = sk.default_model_path() if models() else None
    ours = tokenizer_from_gguf_metadata(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for q in QUESTIONS:
        assert chat_ids(ours, q) == chat_ids(ref, q)
        assert ours.encode(q) == ref.encode(q)
    assert ours.eos_token_id == ref.eos_token_id and ours.bos_token_id == ref.bos_token_id


def test_tokenizer_cached_on_disk_encodes_like_transformers(tmp_path, monkeypatch):
    """The GGUF tokenizer is converted once and then loaded from its cache folder; the cached one
    must still encode (text, chat template, special tokens) like transformers' GGUF tokenizer."""
    from swiftkv_jax.io.gguf import cached_gguf_tokenizer
    monkeypatch.setenv("SWIFTKV_JAX_TOKENIZER_CACHE", str(tmp_path))
    path = sk.default_model_path()
    cached_gguf_tokenizer(path)  # converts and writes the cache
    (folder,) = tmp_path.iterdir()
    assert (folder / "tokenizer.json").exists()
    ours = cached_gguf_tokenizer(path)  # read back from the folder
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for q in QUESTIONS + ["naïve café — 東京 🙂"]:
        assert chat_ids(ours, q) == chat_ids(ref, q)
        assert ours.encode(q) == ref.encode(q)
    assert ours.eos_token_id == ref.eos_token_id and ours.bos_token_id == ref.bos_token_id


@pytest.mark.parametrize("name,layers", [("smollm2-swiftkv", 15), ("smollm2-swiftkv-l21", 21)])
def test_shipped_swiftkv_model_equals_the_reference_and_knows_paris(name, layers):
    """`load(name)` of each shipped model: its SwiftKV tensors merged into the installed GGUF equal
    the independent PyTorch SwiftKV reference on transformers' own load of that GGUF, driven by
    the stored tensors; and the distilled model answers the question every model must."""
    from swiftkv_reference import SwiftKVReference

    from swiftkv_jax.io import shipped

    _, tokenizer, ref = models()
    params, _ = sk.load(name, progress=False)
    cfg = params.config
    assert (cfg.num_key_value_layers, cfg.key_value_group_size) == (layers, 1)
    reference = SwiftKVReference(ref, cfg.num_key_value_layers, cfg.key_value_group_size)
    reference.load_swiftkv_tensors(shipped.MODELS_DIR / name / shipped.TENSORS_FILE)
    ids = chat_ids(tokenizer, QUESTIONS[0])
    ours, _ = sk.forward(params, None, jnp.asarray([ids]), all_logits=True)
    assert rel_err(ours, reference(torch.tensor([ids])).numpy()) <= 1e-4
    answer, _ = sk.generate(params, None, ids, max_new_tokens=20)
    assert "Paris" in tokenizer.decode(answer)

