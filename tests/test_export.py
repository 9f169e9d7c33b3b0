"""Every program generate() and the engine run lowers for TPU and CUDA from this CPU host
(jax.export, which lowers for a platform the machine does not have), in float32 and bfloat16,
with no CPU-only custom call in it: attention kernels are chosen when a program is lowered for a
platform, not when it is traced on one. Lowered for CUDA, paged attention is the Pallas/Triton
kernels (kernels/gpu.py for decode rows, kernels/gpu_prefill.py for prefill chunks); lowered for a
TPU, JAX's Mosaic decode kernel (kernels/tpu.py, head_dim 128k) or our Mosaic kernel
(kernels/tpu_prefill.py: prefill chunks, and decode rows at other head dims)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from conftest import built_kernel
from jax import export

import swiftkv_jax as sk
from swiftkv_jax.kernels import cpu as cpu_kernels
from swiftkv_jax.runtime import prefix_cache
from swiftkv_jax.runtime.logits import mask_words
from swiftkv_jax.runtime.runner import admit_program, decode_program, free_program, mixed_program
from swiftkv_jax.runtime.sampling import SamplingParams
from swiftkv_jax.runtime.scoring import prompt_logprobs_program
from swiftkv_jax.runtime.slots import Admission, empty_slots, insert, set_masks
from swiftkv_jax.runtime.steps import decode, first_tokens, namespace_of, prefill

# A SwiftKV model (L = 2 of 4, g = 2), so plain layers, SwiftKV layers and group K/V all lower.
CFG = sk.ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                     num_kv_heads=2, head_dim=16, num_key_value_layers=2, key_value_group_size=2)
TRITON = "__gpu$xla.gpu.triton"  # the custom call a Pallas GPU kernel lowers to
# Programs with few-query paged attention (decode rows; a SwiftKV prefill's upper layers see one
# query per row): lowered for CUDA, they call the Triton kernel.
WITH_PAGED_KERNEL = {"prefill chunk", "decode loop", "engine decode, 1 step", "engine decode loop",
                     "engine mixed step"}
# Programs with prefill chunks (16+ queries a row) over the paged cache: lowered for CUDA, they call
# our Pallas/Triton prefill kernel (kernels/gpu_prefill.py).
WITH_PREFILL_CHUNKS = {"prefill chunk", "engine mixed step"}
SLOTS, LENGTH, BLOCK = 4, 64, 8


def programs(dtype, int8: bool = False) -> dict[str, tuple]:
    """name -> (jitted function, args, static kwargs) for each program, at engine-like shapes
    (with int8 weights: `int8`)."""
    params = sk.init_params(CFG, jax.random.PRNGKey(0), dtype)
    params = params.quantize("int8", block=16) if int8 else params
    cache = sk.init_cache(params, SLOTS, LENGTH, block_size=BLOCK)
    state = empty_slots(SLOTS, LENGTH, CFG.vocab_size)
    ns = namespace_of(params.weights)
    rows = jnp.arange(SLOTS, dtype=jnp.int32)
    new = jax.tree.map(jnp.asarray, Admission.padded(1, LENGTH, SLOTS, CFG.vocab_size))
    greedy = SamplingParams.make(jnp.zeros(SLOTS), jnp.zeros(SLOTS, jnp.int32), jnp.ones(SLOTS))
    keys = jnp.zeros((SLOTS, 2), jnp.uint32)
    stops = jnp.full((SLOTS, 8), -1, jnp.int32)
    table = cache.block_table
    tokens = jnp.zeros((SLOTS, LENGTH), jnp.int32)
    return {
        "prefill chunk": (prefill, (params, cache, jnp.zeros((SLOTS, 16), jnp.int32), rows), {}),
        "first tokens": (first_tokens, (jnp.zeros((SLOTS, CFG.vocab_size)), greedy, keys), {}),
        "decode loop": (decode, (params, cache, rows, rows, rows, rows, greedy, keys, stops, jnp.int32(4)),
                        dict(out_len=4)),
        "engine decode, 1 step": (decode_program, (params, cache, state, jnp.arange(SLOTS + 1)),
                                  dict(out_len=1)),
        "engine decode loop": (decode_program, (params, cache, state, jnp.arange(3, dtype=jnp.int32)),
                               dict(out_len=8)),
        "engine mixed step": (mixed_program, (params, cache, state, jnp.arange(2 + SLOTS), ns),
                              dict(chunk_rows=1, width=16)),
        "engine admission": (admit_program, (cache, state, new, ns), {}),
        "engine insert": (insert, (state, new), {}),
        "engine grammar masks": (set_masks, (state, rows, jnp.zeros((SLOTS, mask_words(CFG.vocab_size)),
                                                                     jnp.int32)), {}),
        "prompt logprobs": (prompt_logprobs_program, (params, jnp.zeros((1, 16), jnp.int32),
                                                      jnp.asarray([16], jnp.int32)), dict(alternatives=True)),
        "engine free": (free_program, (cache, state, rows[:1], rows[:1], ns), {}),
        "prefix admit": (prefix_cache.admit, (cache.index, table, tokens, rows, rows, ns), {}),
        "prefix publish": (prefix_cache.publish, (cache.index, table, tokens, rows, ns), {}),
        "prefix release": (prefix_cache.release, (cache.index, table, rows), {}),
        "weights namespace": (namespace_of, (params.weights,), {}),
    }


@pytest.mark.parametrize("dtype,int8", [(jnp.float32, False), (jnp.bfloat16, False), (jnp.bfloat16, True)],
                         ids=["f32", "bf16", "int8-bf16"])
def test_every_program_lowers_for_tpu_and_cuda_without_cpu_custom_calls(dtype, int8):
    allow = {"tpu": [], "cuda": [export.DisabledSafetyCheck.custom_call(TRITON)]}
    for name, (fn, args, static) in programs(dtype, int8).items():
        for platform in ("tpu", "cuda"):
            # export refuses custom calls without a compatibility guarantee (the CPU kernel's)
            module = export.export(fn, platforms=(platform,), disabled_checks=allow[platform])(
                *args, **static).mlir_module()
            assert cpu_kernels.PAGED_ATTENTION_TARGET not in module, (name, platform)
            assert cpu_kernels.INT8_MATMUL_TARGET not in module, (name, platform)
            assert (TRITON in module) == (platform == "cuda" and name in WITH_PAGED_KERNEL), (name, platform)
            with_chunks = name in WITH_PREFILL_CHUNKS and platform == "cuda"
            assert ("paged_prefill_attention" in module) == with_chunks, (name, platform)
            # TPU at this head_dim (16): our Mosaic kernel for every paged attention
            on_tpu = platform == "tpu" and name in WITH_PAGED_KERNEL | WITH_PREFILL_CHUNKS
            assert ("paged_chunk_attention" in module) == on_tpu, (name, platform)


def test_the_cpu_kernel_is_chosen_when_lowering_for_the_cpu():
    built_kernel(cpu_kernels.paged_attention_target())
    fn, args, static = programs(jnp.float32)["engine decode, 1 step"]
    allow = [export.DisabledSafetyCheck.custom_call(cpu_kernels.PAGED_ATTENTION_TARGET)]
    on_cpu = export.export(fn, platforms=("cpu",), disabled_checks=allow)(*args, **static).mlir_module()
    on_tpu = export.export(fn, platforms=("tpu",))(*args, **static).mlir_module()
    assert cpu_kernels.PAGED_ATTENTION_TARGET in on_cpu and cpu_kernels.PAGED_ATTENTION_TARGET not in on_tpu


def test_int8_weights_take_the_cpu_kernel_at_decode_and_xla_elsewhere():
    """Lowered for the CPU, an int8 model's decode step calls the int8 matmul kernel; lowered for
    TPU it does not (export also checks that every custom call in a TPU module is one TPU knows)."""
    built_kernel(cpu_kernels.int8_matmul_target())
    progs = programs(jnp.float32, int8=True)
    allow = [export.DisabledSafetyCheck.custom_call(t) for t in
             (cpu_kernels.PAGED_ATTENTION_TARGET, cpu_kernels.INT8_MATMUL_TARGET)]
    lower = lambda name, platform: export.export(progs[name][0], platforms=(platform,), disabled_checks=(
        allow if platform == "cpu" else []))(*progs[name][1], **progs[name][2]).mlir_module()
    assert cpu_kernels.INT8_MATMUL_TARGET in lower("engine decode, 1 step", "cpu")
    assert cpu_kernels.INT8_MATMUL_TARGET not in lower("engine decode, 1 step", "tpu")


def test_decode_attention_lowers_to_each_platforms_kernel():
    """At head_dim 128 (Llama-3.1-8B's) the TPU kernel lowers too: the engine's decode step
    carries the Mosaic kernel for tpu, the Triton kernel for cuda, and neither for the other."""
    cfg = sk.ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=128)
    params = sk.init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    cache = sk.init_cache(params, SLOTS, LENGTH, block_size=BLOCK)
    args = (params, cache, empty_slots(SLOTS, LENGTH, cfg.vocab_size), jnp.arange(SLOTS + 1))
    allow = [export.DisabledSafetyCheck.custom_call(TRITON)]
    tpu = export.export(decode_program, platforms=("tpu",))(*args, out_len=1).mlir_module()
    cuda = export.export(decode_program, platforms=("cuda",), disabled_checks=allow)(
        *args, out_len=1).mlir_module()
    assert "tpu_custom_call" in tpu and TRITON not in tpu
    assert "paged_chunk_attention" not in tpu  # JAX's own kernel where it lowers
    assert TRITON in cuda and "tpu_custom_call" not in cuda


@pytest.mark.parametrize("head_dim,dtype", [(None, jnp.float32), (None, jnp.bfloat16), (128, jnp.bfloat16)])
def test_kernels_in_use_names_what_each_platform_lowers_to(head_dim, dtype):
    """sk.kernels_in_use (what the notebooks print) names a decode kernel for a platform exactly
    when the engine's decode step lowered for that platform carries it."""
    cfg = CFG if head_dim is None else sk.ModelConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
        head_dim=head_dim)
    params = sk.init_params(cfg, jax.random.PRNGKey(0), dtype)
    cache = sk.init_cache(params, SLOTS, LENGTH, block_size=BLOCK)
    args = (params, cache, empty_slots(SLOTS, LENGTH, cfg.vocab_size), jnp.arange(SLOTS + 1))
    allow = [export.DisabledSafetyCheck.custom_call(t) for t in (TRITON, cpu_kernels.PAGED_ATTENTION_TARGET)]
    kernels = (("cpu", cpu_kernels.PAGED_ATTENTION_TARGET, "native C++ kernel"),
               ("cuda", TRITON, "Pallas/Triton"), ("tpu", "tpu_custom_call", "Pallas/Mosaic"))
    for platform, marker, name in kernels:
        module = export.export(decode_program, platforms=(platform,), disabled_checks=allow)(
            *args, out_len=1).mlir_module()
        said = sk.kernels_in_use(params, platform)["decode"]
        assert said.startswith(name if marker in module else "XLA"), (platform, said)
    # Prefill chunks: a plain (not SwiftKV) model's 16-token chunk, block size 16 as the engine's.
    cache = sk.init_cache(params, SLOTS, LENGTH, block_size=16)
    chunk = (params, cache, jnp.zeros((SLOTS, 16), jnp.int32), jnp.arange(SLOTS, dtype=jnp.int32))
    ours = {"cuda": ("paged_prefill_attention", "Pallas/Triton"),
            "tpu": ("paged_chunk_attention", "Pallas/Mosaic")}
    for platform in ("cpu", "cuda", "tpu"):
        module = export.export(prefill, platforms=(platform,), disabled_checks=allow)(*chunk).mlir_module()
        said = sk.kernels_in_use(params, platform)["prefill chunks"]
        marker, name = ours.get(platform, (None, "XLA"))
        assert said.startswith(name if marker and marker in module else "XLA"), said



@pytest.mark.parametrize("length", [48, 40], ids=["6 blocks a row", "5 blocks a row"])
def test_the_triton_kernel_lowers_when_a_rows_blocks_are_not_a_power_of_two(length):
    """Triton takes only power-of-two tensor sizes: with 6 (or 5) blocks a row, the kernel's pages
    per compute block and k-splits must still be powers of two (the H200 run caught 6 and 3)."""
    params = sk.init_params(CFG, jax.random.PRNGKey(0), jnp.bfloat16)
    cache = sk.init_cache(params, SLOTS, length, block_size=BLOCK)
    args = (params, cache, empty_slots(SLOTS, length, CFG.vocab_size), jnp.arange(SLOTS + 1))
    allow = [export.DisabledSafetyCheck.custom_call(TRITON)]
    cuda = export.export(decode_program, platforms=("cuda",), disabled_checks=allow)(
        *args, out_len=1).mlir_module()
    assert TRITON in cuda
