"""Decode attention over the paged pool on CPU: the native kernel (cpu_kernels) vs XLA's gather path.

SmolLM2-135M's attention shape (9 heads, 3 kv heads, head dim 64, block 16), f32, the 30 layers of
one decode step chained in one jitted program, each over its own pools, each row's blocks scattered
over the pool as the engine leaves them. Reported per case: ms for the 30 layers, each path, the ratio, and the share of the
machine's read bandwidth (measured in the same run) the kernel reaches on the bytes it must read
(every row's keys and values once).

Run: PYTHONPATH=. .venv/bin/python benchmarks/bench_decode_attention.py   (about 1 minute)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CpuShare, cpu_name, read_bandwidth, time_calls, timed  # noqa: E402

from swiftkv_jax.kernels import cpu as cpu_kernels  # noqa: E402
from swiftkv_jax.model.attention import DECODE_TILE, attend_paged  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK, LAYERS = 9, 3, 64, 16, 30


def step_of_layers(attention, q, pools, table):
    """One decode step's attention: LAYERS chained calls, each over its own layer's pools (a shared
    pool would be served from the last-level cache after the first layer, as no real model is)."""
    def step(q, pools, table):
        acc = jnp.zeros_like(q)
        for k_pool, v_pool in pools:  # unrolled: each layer's pools are separate arrays, no slicing
            acc = acc + attention(q + 1e-3 * acc, k_pool, v_pool, table)
        return acc
    compiled = jax.jit(step)
    return lambda: compiled(q, pools, table)


def case(rows: int, context: int, repeats: int, target: str) -> dict[str, float]:
    rng = np.random.default_rng(0)
    per_row = -(-(context + 1) // BLOCK)
    pool_tokens = rows * per_row * BLOCK * 2  # a pool twice what the rows hold, as a serving pool
    shape = (KV_HEADS, pool_tokens, HEAD_DIM)
    pools = [tuple(jax.random.normal(jax.random.PRNGKey(2 * i + j), shape) for j in range(2))
             for i in range(LAYERS)]
    table = jnp.asarray(rng.permutation(pool_tokens // BLOCK)[: rows * per_row].reshape(rows, per_row)
                        .astype(np.int32))
    q = jnp.asarray(rng.standard_normal((rows, 1, HEADS, HEAD_DIM), np.float32))
    pos = jnp.full((rows, 1), context, jnp.int32)
    xla = step_of_layers(lambda *a: attend_paged(*a, BLOCK, pos, tile=DECODE_TILE), q, pools, table)
    kernel = step_of_layers(lambda *a: cpu_kernels.paged_attention(target, *a, pos, BLOCK),
                            q, pools, table)
    np.testing.assert_allclose(np.asarray(kernel()), np.asarray(xla()), rtol=1e-4, atol=1e-4)
    timings = {name: time_calls(lambda f=f: timed(lambda: jax.block_until_ready(f())), repeats).best
               for name, f in (("xla", xla), ("kernel", kernel))}
    kv_bytes = LAYERS * rows * (context + 1) * KV_HEADS * HEAD_DIM * 4 * 2
    return {"rows": rows, "context": context, "xla_ms": timings["xla"] * 1e3,
            "kernel_ms": timings["kernel"] * 1e3, "speedup": timings["xla"] / timings["kernel"],
            "kv_bytes": kv_bytes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 1100, 2048])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    target = cpu_kernels.paged_attention_target()
    if target is None:
        print("the CPU kernel is not available here (no compiler, not a CPU, or switched off)")
        return 1
    cpu = CpuShare()
    cpu.start()
    bandwidth = read_bandwidth()
    print(f"CPU ({cpu_name()}): read {bandwidth / 1e9:.1f} GB/s; SmolLM2-135M attention shape, "
          f"{LAYERS} layers of one decode step, f32\n")
    print("| rows | context | XLA gather path ms | kernel ms | speed-up | kernel at % of read bandwidth |")
    print("|---|---|---|---|---|---|")
    for rows in args.rows:
        for context in args.contexts:
            r = case(rows, context, args.repeats, target)
            share = r["kv_bytes"] / bandwidth / (r["kernel_ms"] / 1e3)
            print(f"| {rows} | {context} | {r['xla_ms']:.1f} | {r['kernel_ms']:.1f} | "
                  f"{r['speedup']:.2f}x | {100 * share:.0f}% |", flush=True)
    others = cpu.others()
    if others is not None:
        print(f"\nother processes used {100 * others:.0f}% of the machine's CPU during the run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
