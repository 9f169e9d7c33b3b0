"""Shared fixtures: tiny random Llama / Qwen2 / Qwen3 models built and saved with Hugging Face
transformers.

Tests compare against transformers (PyTorch, f32, eager attention) on the same weights: an
independent reference, not our own code. JAX's persistent compilation cache is on so repeated
runs compile less.
"""

from __future__ import annotations

import gc
import os
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest

from swiftkv_jax.compile_cache import share_compilation_cache

CACHE_DIR = Path(__file__).resolve().parent.parent / ".jax_cache"
share_compilation_cache(CACHE_DIR, min_compile_time_s=0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# Tokenizers converted from GGUF files are kept beside the compiled programs (and inherited by the
# notebooks' kernels and the CLI subprocesses), not in the user's ~/.cache.
os.environ.setdefault("SWIFTKV_JAX_TOKENIZER_CACHE", str(CACHE_DIR / "tokenizers"))
os.environ.setdefault("SWIFTKV_JAX_WEIGHTS_CACHE", str(CACHE_DIR / "weights"))  # GGUFs dequantised once
os.environ.setdefault("SWIFTKV_JAX_KERNEL_CACHE", str(CACHE_DIR / "kernels"))  # CPU kernels built once

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.manual_seed(0)

# name -> config overrides ("family" picks Llama, Qwen2 or Qwen3). All tiny: they build, save and run
# in well under a second.
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
    "qwen2_gqa_tied": dict(family="qwen2", num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=True, rope_theta=1e6),
    "qwen2_mqa_head_dim_24": dict(family="qwen2", num_attention_heads=4, num_key_value_heads=1,
                                  head_dim=24),
    "qwen3_gqa": dict(family="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}
HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
              "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def make_hf_llama(folder: Path, seed: int = 0, family: str = "llama",
                  **overrides) -> "transformers.PreTrainedModel":
    """A random tiny Llama (or Qwen2 / Qwen3: `family`) saved with save_pretrained into `folder`;
    returns the torch model. Norm weights and biases are random too (transformers starts them at
    one and zero), so a mixed-up norm or a dropped bias cannot pass unnoticed."""
    cfg = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-5, initializer_range=0.15, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False, attn_implementation="eager")
    cfg.update(overrides)
    torch.manual_seed(seed)
    config_cls, model_cls = (getattr(transformers, name) for name in HF_CLASSES[family])
    model = model_cls(config_cls(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """Drops every compiled program after each test module. Each one XLA:CPU holds keeps memory
    maps, and a test worker that kept them all reached Linux's limit (vm.max_map_count, 65,530:
    56,000 maps after test_engine + test_prefix_cache), where loading the next program
    segfaulted. A later module that needs a program again reads it from the compilation cache."""
    yield
    jax.clear_caches()
    gc.collect()


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


@pytest.fixture(scope="session")
def qwen2_model(tmp_path_factory):
    """One tiny Qwen2 (q/k/v biases, tied embeddings) for tests that need one."""
    folder = tmp_path_factory.mktemp("qwen2")
    return folder, make_hf_llama(folder, **TINY_CONFIGS["qwen2_gqa_tied"])


def built_kernel(name: str | None) -> str:
    """`name`, a CPU kernel's custom-call name from kernels.cpu.*_target(). Skips only where the
    kernels cannot exist (no C++ compiler, or SWIFTKV_JAX_CPU_KERNELS=off); with a compiler here a
    kernel that did not build fails the test instead of skipping it."""
    from swiftkv_jax.kernels import cpu as cpu_kernels
    if cpu_kernels._compiler() is None or not cpu_kernels.kernels_enabled():
        pytest.skip("no C++ compiler, or CPU kernels switched off: the kernels are not built here")
    assert name is not None, "a C++ compiler is here but the kernel did not build (see its warning)"
    return name


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


def penalised_greedy(hf, prompt: list[int], n: int, *, frequency=0.0, presence=0.0, repetition=1.0,
                     bias: dict[int, float] | None = None) -> list[int]:
    """OpenAI's / vLLM's formulas in NumPy over transformers' logits, greedy: logit_bias added, then
    repetition (prompt and output tokens: positive logits divided, negative multiplied), then
    frequency * count and presence * (count > 0) of the output tokens subtracted."""
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            x = hf(torch.tensor([prompt + out])).logits[0, -1].double().numpy().copy()
        for t, b in (bias or {}).items():
            x[t] += b
        for t in set(prompt) | set(out):
            x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
        for t, c in Counter(out).items():
            x[t] -= frequency * c + presence
        out.append(int(np.argmax(x)))
    return out


@pytest.fixture
def float_kernel_path(monkeypatch):
    """The int8 kernel's float path for one test (rows not quantised, as on CPUs without AVX-512
    VNNI): int8 decode then computes exactly the dequantised model. Programs are traced again."""
    import functools

    import jax

    from swiftkv_jax.kernels import cpu as cpu_kernels
    float_path = functools.partial(cpu_kernels.int8_matmuls, path="float")
    monkeypatch.setattr(cpu_kernels, "int8_matmuls", float_path)
    jax.clear_caches()
    yield
    monkeypatch.undo()
    jax.clear_caches()
