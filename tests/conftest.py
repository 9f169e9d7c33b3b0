"""Shared fixtures: tiny random Llama models built and saved with Hugging Face transformers.

Tests compare against transformers (PyTorch, f32, eager attention) on the same weights: an
independent reference, not our own code. JAX's persistent compilation cache is on so repeated
runs compile less.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import pytest

CACHE_DIR = Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# Tokenizers converted from GGUF files are kept beside the compiled programs (and inherited by the
# notebooks' kernels and the CLI subprocesses), not in the user's ~/.cache.
os.environ.setdefault("SWIFTKV_JAX_TOKENIZER_CACHE", str(CACHE_DIR / "tokenizers"))
os.environ.setdefault("SWIFTKV_JAX_WEIGHTS_CACHE", str(CACHE_DIR / "weights"))  # GGUFs dequantised once
os.environ.setdefault("SWIFTKV_JAX_KERNEL_CACHE", str(CACHE_DIR / "kernels"))  # CPU kernels built once

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.manual_seed(0)

# name -> LlamaConfig overrides. All tiny: they build, save and run in well under a second.
TINY_CONFIGS: dict[str, dict] = {
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "gqa_llama3_rope": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                            max_position_embeddings=256,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 32}),
    "head_dim_24": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24),
}


def make_hf_llama(folder: Path, seed: int = 0, **overrides) -> "transformers.LlamaForCausalLM":
    """A random tiny Llama saved with save_pretrained into `folder`; returns the torch model."""
    cfg = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-5, initializer_range=0.15, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False, attn_implementation="eager")
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mixed-up norm cannot pass unnoticed
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_model(request, tmp_path_factory):
    """(name, folder, torch model) for each tiny config."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    return name, folder, make_hf_llama(folder, **TINY_CONFIGS[name])


@pytest.fixture(scope="session")
def gqa_model(tmp_path_factory):
    """One tiny GQA model for tests that need just one."""
    folder = tmp_path_factory.mktemp("gqa")
    return folder, make_hf_llama(folder, **TINY_CONFIGS["gqa_tied"])


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def hf_logits(model, ids) -> np.ndarray:
    """Logits [B, T, V] of the torch model for token ids [B, T] (no padding)."""
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy generate: n new tokens, eos ignored."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]
