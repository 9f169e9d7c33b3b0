"""The engine's host work per step, with the device work made negligible: a tiny random Llama
(2 layers, hidden 64, vocab 256), so a step's wall time is what Python, dispatch and transfers
cost. On a GPU or TPU a small model's decode step takes about a millisecond: there this *is* the
step. Public API only, so one file measures two checkouts in turn (before / after a change):

    PYTHONPATH=/path/to/checkout .venv/bin/python benchmarks/engine_host_overhead.py

Each case runs twice: with the engine's background loop (engine.start(), as the server runs it)
and driven by the reader (no loop: handle.result() runs engine.step() itself).

Cases (8 slots, no stop ids, after a warm-up run of the same work; best of --repeats):
  decode:  8 requests of 16 prompt + 200 new tokens, decode_steps 1 and 8: tokens/s and ms per
           step (a step = one decode call for every running slot; with 8, up to 8 tokens each)
  mixed:   7 requests decoding 200 tokens while 24 requests of 64 prompt + 1 new token arrive
           (chunk 16), so most steps are a prefill chunk plus a decode token per running slot:
           ms per step
About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

import swiftkv_jax as sk
from swiftkv_jax.compile_cache import enable_compilation_cache

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=16)


def run(engine: sk.Engine, work: list[tuple[list[int], int]]) -> tuple[float, int, int]:
    """(seconds, tokens produced, engine steps) for `work` submitted at once and read to the end."""
    steps0 = engine.stats()["steps"]
    t0 = time.perf_counter()
    handles = [engine.submit(p, sk.SamplingOptions(max_tokens=n, stop_ids=())) for p, n in work]
    produced = sum(len(h.result()) for h in handles)
    return time.perf_counter() - t0, produced, engine.stats()["steps"] - steps0


def best_of(engine: sk.Engine, work: list[tuple[list[int], int]], repeats: int) -> tuple[float, int, int]:
    run(engine, work)  # warm-up: every program this work needs is compiled
    return min((run(engine, work) for _ in range(repeats)), key=lambda r: r[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    print(f"swiftkv_jax from {sk.__file__}; {jax.devices()[0].device_kind}", file=sys.stderr)
    enable_compilation_cache()
    params = sk.init_params(sk.ModelConfig(**CONFIG), jax.random.PRNGKey(0))
    decode_work = [([3 + i] * 16, 200) for i in range(8)]
    mixed_work = [([5 + i] * 8, 200) for i in range(7)] + [([i % 200 + 7] * 64, 1) for i in range(24)]
    for loop in (True, False):
        how = "background loop" if loop else "reader-driven  "
        for steps in (1, 8):
            engine = sk.Engine(params, max_slots=8, max_length=256, decode_steps=steps)
            if loop:
                engine.start()
            seconds, produced, n = best_of(engine, decode_work, args.repeats)
            engine.stop()
            print(f"{how} decode_steps={steps}: {produced / seconds:>8,.0f} tokens/s, {n} steps, "
                  f"{1e3 * seconds / n:.3f} ms per step, {1e3 * seconds / (produced / 8):.3f} ms per "
                  f"token-step (8 slots)", flush=True)
        engine = sk.Engine(params, max_slots=8, max_length=256, decode_steps=1, chunk_size=16)
        if loop:
            engine.start()
        seconds, produced, n = best_of(engine, mixed_work, args.repeats)
        engine.stop()
        print(f"{how} mixed (chunk 16, 7 decoding + 24 prompts of 64): {n} steps, "
              f"{1e3 * seconds / n:.3f} ms per step", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
