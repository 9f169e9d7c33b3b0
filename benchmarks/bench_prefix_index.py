"""The prefix index at accelerator pool sizes: admission and publication time per request as the
pool grows (issue 28's floor: 65,536 blocks within 2x of 4,096).

    PYTHONPATH=/path/to/checkout .venv/bin/python benchmarks/bench_prefix_index.py

One 1000-token prompt per request (random tokens, so every block is new), 70 blocks reserved, a
2048-token row (128 blocks of 16), after a warm-up request; best of 5. The pool fills with
registered blocks as requests come, so later admissions evict (the least recently used path).
Calls the index's functions directly (no engine), jitted with the index donated as the engine's
programs donate the cache (without donation every call copies the index: O(pool) by itself).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from swiftkv_jax.runtime import prefix_cache
from swiftkv_jax.runtime.prefix_cache import empty_index

admit, publish, release = (jax.jit(getattr(prefix_cache, name).__wrapped__, donate_argnums=0)
                           for name in ("admit", "publish", "release"))

BLOCK, ROW, PROMPT, RESERVED = 16, 2048, 1000, 70


def main() -> int:
    together = {}
    for num_blocks in (4096, 16384, 65536):
        idx = empty_index(num_blocks, BLOCK)
        rng = np.random.default_rng(0)
        namespace, table0 = jnp.uint32(7), jnp.zeros((1, ROW // BLOCK), jnp.int32)
        times = []
        for _ in range(8):
            tokens = np.zeros((1, ROW), np.int32)
            tokens[0, :PROMPT] = rng.integers(0, 30000, PROMPT)
            tokens, lengths = jnp.asarray(tokens), jnp.asarray([PROMPT])
            t0 = time.perf_counter()
            idx, table, _, ok = admit(idx, table0, tokens, lengths, jnp.asarray([RESERVED]), namespace)
            jax.block_until_ready(idx)
            t1 = time.perf_counter()
            idx = jax.block_until_ready(publish(idx, table, tokens, lengths, namespace))
            t2 = time.perf_counter()
            idx = release(idx, table, jnp.asarray([RESERVED]))
            assert bool(ok)
            times.append((t1 - t0, t2 - t1))
        a, p = (min(t[i] for t in times[1:]) for i in (0, 1))
        together[num_blocks] = a + p
        print(f"{num_blocks:6d} blocks: admit {a * 1e3:5.2f} ms, publish {p * 1e3:5.2f} ms, "
              f"together {(a + p) * 1e3:5.2f} ms per request", flush=True)
    print(f"65,536 / 4,096 blocks: {together[65536] / together[4096]:.2f}x (floor: 2x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
