"""Attention straight from the paged pool == a float64 numpy softmax over each row's keys.

The pool's blocks are shuffled between rows (as the prefix cache leaves them), rows hold different
lengths, and the chunk shapes cover a decode step, a prefill chunk and a chunk longer than one
query tile, each with the last query position inside and on a tile boundary.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from swiftkv_jax.model.attention import ATTENTION_TILE, attend_paged

KV_HEADS, GROUP, HEAD_DIM, BLOCK = 2, 3, 16, 16


def reference(q, k_rows, v_rows, q_pos):
    """Causal GQA attention in float64: q [B, T, H, h]; k/v_rows [B, S, K, h] by position."""
    b, t, h, d = q.shape
    out = np.zeros(q.shape)
    for r in range(b):
        for i in range(t):
            n = q_pos[r, i] + 1
            for head in range(h):
                kv = head // GROUP
                s = k_rows[r, :n, kv] @ q[r, i, head] / np.sqrt(d)
                p = np.exp(s - s.max())
                out[r, i, head] = (p / p.sum()) @ v_rows[r, :n, kv]
    return out


@pytest.mark.parametrize("chunk,starts", [(1, [0, 37, 255, 300]), (40, [0, 216, 100, 5]),
                                          (ATTENTION_TILE + 44, [0, 12, 256, 1])],
                         ids=["decode", "prefill", "longer-than-a-tile"])
def test_paged_attention_matches_reference(chunk, starts):
    rng = np.random.default_rng(chunk)
    rows, blocks_per_row = len(starts), 40
    num_blocks = rows * blocks_per_row
    table = rng.permutation(num_blocks).reshape(rows, blocks_per_row).astype(np.int32)
    k_pool = rng.standard_normal((KV_HEADS, num_blocks * BLOCK, HEAD_DIM)).astype(np.float32)
    v_pool = rng.standard_normal((KV_HEADS, num_blocks * BLOCK, HEAD_DIM)).astype(np.float32)
    q = rng.standard_normal((rows, chunk, KV_HEADS * GROUP, HEAD_DIM)).astype(np.float32)
    q_pos = np.asarray(starts, np.int32)[:, None] + np.arange(chunk, dtype=np.int32)
    # Row r's key at position p, gathered by hand from the pool through the block table.
    slots = (table[:, :, None] * BLOCK + np.arange(BLOCK)).reshape(rows, -1)
    k_rows, v_rows = (pool.transpose(1, 0, 2)[slots] for pool in (k_pool, v_pool))
    ours = attend_paged(jnp.asarray(q), jnp.asarray(k_pool), jnp.asarray(v_pool), jnp.asarray(table),
                        BLOCK, jnp.asarray(q_pos))
    ref = reference(q.astype(np.float64), k_rows.astype(np.float64), v_rows.astype(np.float64), q_pos)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-5)
