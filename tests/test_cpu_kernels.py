"""The native CPU paged-attention kernel against a plain NumPy attention over the same keys.

The reference gathers each row's keys by position from the pool and runs a dense, masked softmax
in float64: independent of both the kernel and XLA's gather path.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import built_kernel

from swiftkv_jax.kernels import cpu as cpu_kernels
from swiftkv_jax.model.attention import attend_paged


def reference(q, k_pool, v_pool, table, q_pos, block_size):
    """NumPy float64 causal GQA attention of q [B, T, H, D] over each row's paged keys."""
    b, t, h, d = q.shape
    kvh = k_pool.shape[0]
    out = np.zeros((b, t, h, d))
    for row in range(b):
        for i in range(t):
            p = q_pos[row, i]
            if p < 0:
                continue
            slots = [table[row, j // block_size] * block_size + j % block_size for j in range(p + 1)]
            for head in range(h):
                kh = head // (h // kvh)
                keys, values = k_pool[kh, slots].astype(np.float64), v_pool[kh, slots].astype(np.float64)
                s = keys @ q[row, i, head].astype(np.float64) / np.sqrt(d)
                w = np.exp(s - s.max())
                out[row, i, head] = (w / w.sum()) @ values
    return out


CASES = [  # rows, queries per row, heads, kv heads, head dim, block size, blocks per row
    dict(b=8, t=1, h=9, kvh=3, d=64, bs=16, nb=12),   # SmolLM2's decode shape
    dict(b=3, t=4, h=4, kvh=2, d=24, bs=8, nb=6),     # several queries per row, odd head dim
    dict(b=2, t=1, h=4, kvh=1, d=32, bs=4, nb=9),     # MQA
    dict(b=2, t=2, h=4, kvh=4, d=16, bs=16, nb=3),    # MHA
    dict(b=2, t=3, h=6, kvh=2, d=12, bs=4, nb=5),     # a head dim the vector path does not take
    # Fewer (row, kv head) pairs than threads: each pair's keys split over threads, then merged;
    # the query at 200 has no key in the later split, the one at -1 none at all.
    dict(b=2, t=3, h=4, kvh=1, d=64, bs=16, nb=40, positions=[[-1, 200, 600], [98, 99, 100]]),
]


@pytest.fixture(scope="module")
def target():
    return built_kernel(cpu_kernels.paged_attention_target())


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c['b']}t{c['t']}h{c['h']}k{c['kvh']}d{c['d']}")
def test_kernel_matches_reference(target, case):
    rng = np.random.default_rng(0)
    b, t, h, kvh, d, bs, nb = (case[k] for k in ("b", "t", "h", "kvh", "d", "bs", "nb"))
    pool_blocks = b * nb + 5
    k_pool = rng.standard_normal((kvh, pool_blocks * bs, d), dtype=np.float32)
    v_pool = rng.standard_normal((kvh, pool_blocks * bs, d), dtype=np.float32)
    table = rng.permutation(pool_blocks)[: b * nb].reshape(b, nb).astype(np.int32)
    table[1 % b, :2] = table[0, :2]  # two rows share a prefix, as the prefix cache makes them
    q = rng.standard_normal((b, t, h, d), dtype=np.float32)
    # Last positions: on a block edge, just past one, the table's last slot, a single key.
    last = np.array([bs - 1, bs, nb * bs - 1, 0, 2 * bs + 3, nb * bs - t - 1, 5, bs * 2][:b])
    q_pos = (last[:, None] - np.arange(t)[::-1][None, :]).astype(np.int32)
    if t > 1:
        q_pos[0, 0] = -1  # a padding query: no keys, zeros out
    if "positions" in case:
        q_pos = np.array(case["positions"], np.int32)
    got = cpu_kernels.paged_attention(target, *map(jnp.asarray, (q, k_pool, v_pool, table, q_pos)), bs)
    want = reference(q, k_pool, v_pool, table, q_pos, bs)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    xla = attend_paged(*map(jnp.asarray, (q, k_pool, v_pool, table)), bs, jnp.asarray(q_pos), tile=bs)
    valid = q_pos >= 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(xla)[valid], rtol=1e-5, atol=1e-5)


def test_decode_attention_uses_kernel_on_cpu(target, monkeypatch):
    """attend_paged routes decode-shaped float32 calls to the kernel, and not with it switched off."""
    q = jnp.zeros((2, 1, 4, 8))
    pools = jnp.zeros((2, 64, 8)), jnp.zeros((2, 64, 8))
    table, pos = jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 1), jnp.int32)
    hlo = lambda: jax.jit(lambda *a: attend_paged(*a, 16, pos)).lower(q, *pools, table).as_text()
    assert target in hlo()
    monkeypatch.setenv(cpu_kernels.ENABLE_ENV, "off")
    cpu_kernels.forget_targets()
    try:
        assert target not in hlo()
    finally:
        monkeypatch.undo()
        cpu_kernels.forget_targets()
        assert cpu_kernels.paged_attention_target() == target


def test_failed_build_warns_and_falls_back(tmp_path, monkeypatch):
    """A compiler that fails leaves XLA's path in place, with a warning that says so."""
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("SWIFTKV_JAX_KERNEL_CACHE", str(tmp_path))
    cpu_kernels.forget_targets()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cpu_kernels.paged_attention_target() is None
        assert any("using XLA's path" in str(w.message) for w in caught), caught
        assert not list(tmp_path.glob("*.so"))
    finally:
        monkeypatch.undo()
        cpu_kernels.forget_targets()
