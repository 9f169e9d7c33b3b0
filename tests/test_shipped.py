"""Shipped SwiftKV models: only the SwiftKV tensors are stored (float16, HF names); merged on load
with the base they were trained on, checked by fingerprint. The merged model must equal the
independent PyTorch reference driven by the stored tensors, read with safetensors' own loader."""

import jax.numpy as jnp
import pytest
import torch
from conftest import make_hf_llama, prompts, rel_err
from safetensors.torch import load_file
from swiftkv_reference import SwiftKVReference

import swiftkv_jax as sk
from swiftkv_jax.io import shipped
from swiftkv_jax.io.shipped import ShippedModelError

N, L = 6, 2


@pytest.fixture(scope="module", params=[1, 2], ids=lambda g: f"g{g}")
def shipped_tiny(request, tmp_path_factory):
    """(models dir holding "tiny-swiftkv", the plain base params, the torch reference, g)."""
    g = request.param
    folder = tmp_path_factory.mktemp(f"shipped_g{g}")
    base_torch = make_hf_llama(folder / "base", num_hidden_layers=N, tie_word_embeddings=(g == 2))
    ref = SwiftKVReference(base_torch, num_key_value_layers=L, group_size=g, seed=10 + g)
    ref.save_llama_swiftkv(folder / "swiftkv")
    distilled, _ = sk.load(folder / "swiftkv", progress=False)
    shipped.save_swiftkv_tensors(distilled, folder / "models" / "tiny-swiftkv")
    base, _ = sk.load(folder / "base", progress=False)
    return folder / "models", base, ref, g


def test_only_the_swiftkv_tensors_are_stored_in_float16(shipped_tiny):
    models, _, _, g = shipped_tiny
    stored = load_file(str(models / "tiny-swiftkv" / shipped.TENSORS_FILE))
    expected = {"model.norm_swiftkv.weight"} | {
        f"model.layers.{l}.self_attn.q_proj_swiftkv.weight" for l in range(L, N)} | {
        f"model.layers.{l}.self_attn.{p}_swiftkv.weight" for l in range(L, N, g) for p in ("k_proj", "v_proj")}
    assert set(stored) == expected
    assert all(t.dtype == torch.float16 for t in stored.values())


def test_merged_model_equals_the_reference_on_the_stored_tensors(shipped_tiny, monkeypatch):
    models, base, ref, g = shipped_tiny
    monkeypatch.setattr(shipped, "MODELS_DIR", models)
    assert shipped.names() == ["tiny-swiftkv"]
    params = shipped.load_shipped("tiny-swiftkv", base)
    cfg = params.config
    assert (cfg.num_key_value_layers, cfg.key_value_group_size) == (L, g)
    ref.load_swiftkv_tensors(models / "tiny-swiftkv" / shipped.TENSORS_FILE)
    ids = prompts(160, [12], seed=g)
    ours, _ = sk.forward(params, None, jnp.asarray(ids), all_logits=True)
    assert rel_err(ours, ref(torch.tensor(ids)).numpy()) <= 1e-4
    # SwiftKV off is the base model, bit for bit.
    off = sk.swiftkv_off(params)
    assert all(bool(jnp.array_equal(off.weights["layers"][i]["q_proj"], base.weights["layers"][i]["q_proj"]))
               for i in range(N))


def test_load_by_name_and_wrong_base_or_name_are_refused(shipped_tiny, monkeypatch, gqa_model):
    models, base, _, _ = shipped_tiny
    monkeypatch.setattr(shipped, "MODELS_DIR", models)
    other, _ = sk.load(gqa_model[0], progress=False)
    with pytest.raises(ShippedModelError, match="fingerprint"):
        shipped.load_shipped("tiny-swiftkv", other)
    with pytest.raises(ShippedModelError, match="tiny-swiftkv"):
        shipped.load_shipped("no-such-model", base)
    with pytest.raises(FileNotFoundError, match="tiny-swiftkv"):
        sk.load("no-such-model")
    with pytest.raises(ShippedModelError, match="already SwiftKV"):
        shipped.load_shipped("tiny-swiftkv", sk.to_swiftkv(base, L, 1))
