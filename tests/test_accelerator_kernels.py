"""The accelerator paged-attention kernels (JAX's Pallas kernels behind kernels/gpu.py (Triton)
and kernels/tpu.py (Mosaic), our own kernels/gpu_prefill.py (Triton) and kernels/tpu_prefill.py
(Mosaic)), run in Pallas' interpret modes on the CPU, against a NumPy float64
attention over the same paged keys (test_cpu_kernels.reference, independent of the kernels and of
XLA's path): GQA, MQA and MHA, several queries per row, rows sharing prefix blocks, positions on
and after block edges, a padding row, float32 and bfloat16."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from numerics import BF16_EPS
from test_cpu_kernels import reference

from swiftkv_jax.kernels import gpu as gpu_kernels
from swiftkv_jax.kernels import gpu_prefill, tpu_prefill
from swiftkv_jax.kernels import tpu as tpu_kernels


def run_gpu(q, k_pool, v_pool, table, q_pos, bs):
    return gpu_kernels.paged_attention(q, k_pool, v_pool, table, q_pos, bs, interpret=True)


def run_tpu(q, k_pool, v_pool, table, q_pos, bs):
    from jax.experimental.pallas import tpu as pltpu
    with pltpu.force_tpu_interpret_mode():
        return tpu_kernels.paged_attention(q, k_pool, v_pool, table, q_pos, bs)


def run_tpu_chunk(q, k_pool, v_pool, table, q_pos, bs):
    from jax.experimental.pallas import tpu as pltpu
    with pltpu.force_tpu_interpret_mode():  # the TPU interpreter: DMAs, scalar prefetch, scratch
        return tpu_prefill.paged_chunk_attention(q, k_pool, v_pool, table, q_pos, bs)


CASES = [  # rows, queries per row, heads, kv heads, head dim, block size, blocks per row
    dict(b=4, t=1, h=9, kvh=3, d=64, bs=16, nb=12),   # SmolLM2's decode shape
    dict(b=3, t=3, h=4, kvh=2, d=32, bs=8, nb=6),     # several queries per row (a short chunk)
    dict(b=2, t=1, h=4, kvh=1, d=16, bs=4, nb=9),     # MQA
    dict(b=2, t=2, h=4, kvh=4, d=16, bs=16, nb=3),    # MHA
]
TPU_CASES = [  # the TPU kernel lowers for head_dim a multiple of 128 only
    dict(b=3, t=1, h=8, kvh=2, d=128, bs=16, nb=6),   # Llama-3.1-8B's decode shape, fewer heads
    dict(b=2, t=3, h=4, kvh=1, d=128, bs=8, nb=4),    # MQA, several queries per row
]
KERNELS = ([("gpu", run_gpu, c) for c in CASES] + [("tpu", run_tpu, c) for c in TPU_CASES]
           + [("tpu-chunk", run_tpu_chunk, c) for c in CASES if tpu_prefill.supported(c["d"], c["bs"])])
SUPPORTED = {"gpu": lambda c: gpu_kernels.supported(c["d"]), "tpu": lambda c: tpu_kernels.supported(c["d"]),
             "tpu-chunk": lambda c: tpu_prefill.supported(c["d"], c["bs"])}


def _id(k) -> str:
    name, _, c = k
    return f"{name}-b{c['b']}t{c['t']}h{c['h']}k{c['kvh']}d{c['d']}"


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kernel", KERNELS, ids=_id)
def test_the_kernel_matches_reference_in_interpret_mode(kernel, dtype):
    name, run, case = kernel
    rng = np.random.default_rng(1)
    b, t, h, kvh, d, bs, nb = (case[k] for k in ("b", "t", "h", "kvh", "d", "bs", "nb"))
    assert SUPPORTED[name](case)
    pool_blocks = b * nb + 5
    rounded = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))  # what the kernel sees
    k_pool, v_pool = (rounded(rng.standard_normal((kvh, pool_blocks * bs, d))) for _ in range(2))
    table = rng.permutation(pool_blocks)[: b * nb].reshape(b, nb).astype(np.int32)
    table[1, :2] = table[0, :2]  # two rows share a prefix, as the prefix cache makes them
    q = rounded(rng.standard_normal((b, t, h, d)))
    # Last positions: on a block edge, just past one, the table's last slot, a single key.
    last = np.array([bs - 1, bs, nb * bs - 1, 0][:b])
    q_pos = np.maximum(last[:, None] - np.arange(t)[::-1][None, :], 0).astype(np.int32)
    padding = b - 1  # a padding row (the engine's out-of-range slot): its table is all block 0
    table[padding] = 0
    got = run(*(jnp.asarray(x, dtype) for x in (q, k_pool, v_pool)), jnp.asarray(table),
              jnp.asarray(q_pos), bs)
    assert got.shape == q.shape and got.dtype == dtype
    want = reference(q, k_pool, v_pool, table, q_pos, bs)
    # bf16: the output's rounding. The TPU kernel's matmuls run at the TPU's default precision
    # (bfloat16 passes) even for float32 inputs, so it is held to bfloat16's tolerance throughout.
    tol = 1e-5 if dtype == np.float32 and name != "tpu" else 4 * BF16_EPS
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)


# rows, queries per row, heads, kv heads, head dim, block size, blocks per row, each row's first position
PREFILL_CASES = [
    dict(b=2, t=40, h=9, kvh=3, d=64, bs=16, nb=12, start=[0, 100]),  # SmolLM2: a first chunk, a later one
    dict(b=2, t=70, h=4, kvh=1, d=32, bs=8, nb=20, start=[5, 80]),    # MQA, two query tiles, 8-token blocks
    dict(b=3, t=16, h=4, kvh=4, d=16, bs=32, nb=5, start=[31, 32, 0]),  # MHA, on/after a block edge
    dict(b=2, t=150, h=8, kvh=2, d=128, bs=16, nb=24, start=[0, 200]),  # 8B's head_dim, two TPU tiles
]


PREFILL_KERNELS = {
    "gpu": (gpu_prefill.supported, functools.partial(gpu_prefill.paged_prefill_attention, interpret=True)),
    "tpu": (tpu_prefill.supported, run_tpu_chunk),
}


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", PREFILL_CASES,
                         ids=lambda c: f"b{c['b']}t{c['t']}h{c['h']}k{c['kvh']}d{c['d']}")
@pytest.mark.parametrize("kernel", PREFILL_KERNELS)
def test_the_prefill_kernel_matches_reference_in_interpret_mode(kernel, case, dtype):
    """Our prefill-chunk kernels (kernels/gpu_prefill.py: Triton, kernels/tpu_prefill.py: Mosaic) in
    interpret mode: a chunk of queries over each row's cached prefix and itself, rows sharing prefix
    blocks, padding queries (-1) inside a tile with real ones, which must come out as zeros."""
    supported, run = PREFILL_KERNELS[kernel]
    rng = np.random.default_rng(2)
    b, t, h, kvh, d, bs, nb = (case[k] for k in ("b", "t", "h", "kvh", "d", "bs", "nb"))
    assert supported(d, bs)
    pool_blocks = b * nb + 3
    rounded = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
    k_pool, v_pool = (rounded(rng.standard_normal((kvh, pool_blocks * bs, d))) for _ in range(2))
    table = rng.permutation(pool_blocks)[: b * nb].reshape(b, nb).astype(np.int32)
    table[1, :2] = table[0, :2]  # two rows share a prefix
    q = rounded(rng.standard_normal((b, t, h, d)))
    q_pos = (np.asarray(case["start"])[:, None] + np.arange(t)[None, :]).astype(np.int32)
    q_pos[-1, t - 5:] = -1  # the last row's chunk ends early: padding queries
    assert q_pos.max() < nb * bs
    got = run(*(jnp.asarray(x, dtype) for x in (q, k_pool, v_pool)), jnp.asarray(table),
              jnp.asarray(q_pos), bs)
    assert got.shape == q.shape and got.dtype == dtype
    want = reference(q, k_pool, v_pool, table, q_pos, bs)
    tol = 1e-5 if dtype == np.float32 else 4 * BF16_EPS
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)
    assert not np.asarray(got[-1, t - 5:]).any()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_the_engine_on_a_platforms_kernels_answers_as_on_xlas_path(platform, monkeypatch):
    """Every paged attention the engine runs (prefill chunks over a cached prefix, mixed steps,
    decode rows, a SwiftKV model's upper layers, padding rows) on a platform's kernels in interpret
    mode, as the programs take them when lowered for it (CUDA: the two Triton kernels; TPU, at this
    head_dim: our Mosaic kernel for both): the same greedy answers as on the CPU's own path. Catches
    a contract the kernels' own tests do not see (the engine's padding rows, tables, positions)."""
    import jax

    import swiftkv_jax as sk

    cfg = sk.ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                         num_kv_heads=2, head_dim=16)
    # SwiftKV L = 2 of 4: the lower layers take the prefill kernel, the upper ones (a prompt's last
    # token) and decode rows the decode kernel
    params = sk.to_swiftkv(sk.init_params(cfg, jax.random.PRNGKey(3), jnp.float32), 2, 1)
    rng = np.random.default_rng(5)
    shared = rng.integers(3, 256, 40).tolist()  # a prefix two prompts share (a prefix-cache hit)
    work = [shared + rng.integers(3, 256, 9).tolist(), shared + rng.integers(3, 256, 30).tolist(),
            rng.integers(3, 256, 70).tolist(), rng.integers(3, 256, 5).tolist()]

    def answers(params):
        engine = sk.Engine(params, max_slots=4, max_length=128, chunk_size=32, decode_steps=4)
        handles = [engine.submit(p, sk.SamplingOptions(max_tokens=12, stop_ids=())) for p in work]
        out = [h.result() for h in handles]
        engine.stop()
        return out

    expected = answers(params)
    on_platform = lambda *args, default, **kernels: (kernels.get(platform) or default)(*args)
    monkeypatch.setattr(jax.lax, "platform_dependent", on_platform)
    interpreted = {"cuda": [(gpu_kernels, "paged_attention"), (gpu_prefill, "paged_prefill_attention")],
                   "tpu": [(tpu_prefill, "paged_chunk_attention")]}[platform]
    for module, name in interpreted:
        monkeypatch.setattr(module, name, functools.partial(getattr(module, name), interpret=True))
    jax.clear_caches()  # the engine's programs were traced on the CPU's path: trace them again
    try:
        assert answers(params) == expected
    finally:
        monkeypatch.undo()
        jax.clear_caches()  # nothing traced on the kernels outlives this test
