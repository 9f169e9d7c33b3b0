"""Case (a) of bench_engine.py alone (32 requests of 900-1100 random prompt tokens, 32-64 new,
all at once; engine total tokens/s, SwiftKV L15 vs off, best of 2 runs), through the public API
only, so the same file measures two checkouts of the library in turn (before / after a change):

    PYTHONPATH=/path/to/checkout .venv/bin/python benchmarks/engine_throughput_ab.py

About 8 minutes on 2 cores with the compilation cache warm. SmolLM2-135M-Instruct (the shipped
GGUF), f32; the full engine benchmark with generate() beside it is bench_engine.py.
`--int8` adds both models with int8 weights (params.quantize), ~16 minutes in all.
"""

from __future__ import annotations

import gc
import sys
import time

import jax
import numpy as np

import swiftkv_jax as sk
from swiftkv_jax.compile_cache import enable_compilation_cache


def main() -> int:
    print(f"swiftkv_jax from {sk.__file__}", file=sys.stderr)
    enable_compilation_cache()
    base, _ = sk.load(progress=False)
    rng = np.random.default_rng(0)
    vocab = base.config.vocab_size
    work = [(rng.integers(3, vocab, int(rng.integers(900, 1101))).tolist(), int(rng.integers(32, 65)))
            for _ in range(32)]
    max_length = -(-(1100 + 64) // 16) * 16
    rates = {}
    models = {"L15": sk.to_swiftkv(base, 15, 1), "off": base}
    if "--int8" in sys.argv[1:]:
        models.update({f"{name} int8": params.quantize("int8") for name, params in list(models.items())})
    for name, params in models.items():
        engine = sk.Engine(params, max_slots=8, max_length=max_length, chunk_size=256, decode_steps=8)
        print(f"{name}: warm-up {engine.warmup():.0f} s", file=sys.stderr)
        best = 0.0
        for _ in range(2):
            t0 = time.perf_counter()
            handles = [engine.submit(p, sk.SamplingOptions(max_tokens=n, stop_ids=())) for p, n in work]
            outs = [h.result() for h in handles]
            tokens = sum(len(p) for p, _ in work) + sum(map(len, outs))
            best = max(best, tokens / (time.perf_counter() - t0))
            engine.cache = engine.cache.clear()  # the second run must not hit the first's prompts
        rates[name] = best
        print(f"(a) engine {name}: {best:.0f} total tokens/s (best of 2)", flush=True)
        del engine
        # Four engines' executables in one process ran the CPU out of mapped memory ("LLVM
        # compilation error: Cannot allocate memory", 2026-12-04): drop each one's programs.
        jax.clear_caches()
        gc.collect()
    print(f"(a) SwiftKV L15 vs off: {rates['L15'] / rates['off']:.2f}x")
    if "L15 int8" in rates:
        print(f"(a) int8 vs float32: L15 {rates['L15 int8'] / rates['L15']:.2f}x, off "
              f"{rates['off int8'] / rates['off']:.2f}x; SwiftKV L15 vs off with int8: "
              f"{rates['L15 int8'] / rates['off int8']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
