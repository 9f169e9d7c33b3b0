"""Prefix cache: time to first token with and without reuse, hit rates, overhead when nothing hits.

SmolLM2-135M-Instruct, plain and SwiftKV (L = 15), in one run:
  (a) a shared system prompt (1024 tokens) with 16 different 32-token questions, one after another;
  (b) a 4-turn chat: each turn's prompt is the whole conversation so far (answers included);
  (c) 16 prompts with nothing in common (0% overlap): the index's cost when nothing hits.
"With cache" passes the cache from request to request; "without" clears it before each request
(`cache.clear()`), so both run the same code and compile the same programs. TTFT is generate()'s
prefill_s: prefix lookup and block allocation, then prefill of the uncached tokens. The overhead in
(c) compares that with a bare jitted prefill of the same prompt that skips the index entirely.
Every case runs twice and the second run is reported, so no time is compilation. TTFTs are medians
over the requests (the first request of (a) and each chat turn are reported apart).

Run: PYTHONPATH=. .venv/bin/python benchmarks/bench_prefix_cache.py   (about 5 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, CpuShare, emptied, log  # noqa: E402

import swiftkv_jax as sk  # noqa: E402
from swiftkv_jax.runtime.generation import prefill_chunked  # noqa: E402

FLOOR_SHARED_SPEEDUP = 5.0
FLOOR_OVERHEAD = 0.05


def tokens(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return rng.integers(100, vocab, n).tolist()


def ttft(params: sk.Params, cache: sk.KVCache, prompt: list[int], new: int, reuse: bool
         ) -> tuple[float, list[int], sk.KVCache]:
    """(seconds to first token, the answer, the cache) of one request."""
    if not reuse:
        cache = cache.clear()
    t: dict[str, float] = {}
    answer, cache = sk.generate(params, cache, prompt, max_new_tokens=new, timings=t, stop_ids=[])
    return t["prefill_s"], answer, cache


def shared_system_prompt(params, cache, args, rng) -> tuple[dict[str, Any], sk.KVCache]:
    vocab = params.config.vocab_size
    system = tokens(rng, args.system_tokens, vocab)
    questions = [tokens(rng, args.question_tokens, vocab) for _ in range(args.requests)]
    out: dict[str, Any] = {}
    for reuse in (False, True):
        cache = cache.clear()
        before = cache.stats()
        times = []
        for q in questions:
            t, _, cache = ttft(params, cache, system + q, args.new_tokens, reuse)
            times.append(t)
        out["with" if reuse else "without"] = {"first_s": times[0], "rest_median_s": statistics.median(times[1:]),
                                               "hit_rate": _hit_rate(before, cache.stats())}
    out["speedup_after_first"] = out["without"]["rest_median_s"] / out["with"]["rest_median_s"]
    return out, cache


def _hit_rate(before: dict, after: dict) -> float:
    return (after["hit_tokens"] - before["hit_tokens"]) / max(after["query_tokens"] - before["query_tokens"], 1)


def chat(params, cache, args, rng) -> dict[str, Any]:
    vocab = params.config.vocab_size
    messages = [tokens(rng, args.question_tokens, vocab) for _ in range(args.turns)]
    out: dict[str, Any] = {}
    for reuse in (False, True):
        cache = cache.clear()
        before = cache.stats()
        history: list[int] = tokens(rng, 64, vocab)  # a short system prompt
        times = []
        for m in messages:
            history = history + m
            t, answer, cache = ttft(params, cache, history, args.chat_answer_tokens, reuse)
            history = history + answer
            times.append(t)
        out["with" if reuse else "without"] = {"per_turn_s": times, "hit_rate": _hit_rate(before, cache.stats())}
    out["speedup_later_turns"] = (statistics.median(out["without"]["per_turn_s"][1:])
                                  / statistics.median(out["with"]["per_turn_s"][1:]))
    return out, cache


def no_overlap(params, cache, args, rng) -> dict[str, Any]:
    vocab = params.config.vocab_size
    length = args.system_tokens + args.question_tokens
    prompts = [tokens(rng, length, vocab) for _ in range(args.requests)]
    with_index, bare = [], []
    cache = cache.clear()
    hits_before = cache.stats()["hit_tokens"]
    for p in prompts:  # interleaved: generate() whose lookups all miss, then a bare prefill
        t, _, cache = ttft(params, cache, p, args.new_tokens, reuse=True)
        with_index.append(t)
        x = np.zeros((cache.batch_size, cache.max_length), np.int32)
        x[0, :length] = p
        cache = emptied(cache)
        start = time.perf_counter()
        logits, cache = prefill_chunked(params, cache, x, np.zeros((1,), np.int32),
                                        np.asarray([length], np.int32))
        logits.block_until_ready()
        bare.append(time.perf_counter() - start)
    assert cache.stats()["hit_tokens"] == hits_before
    w, b = statistics.median(with_index[1:]), statistics.median(bare[1:])
    return {"with_index_s": w, "bare_prefill_s": b, "overhead": w / b - 1}, cache


def run_model(name: str, params: sk.Params, args) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    longest = args.system_tokens + args.turns * (args.question_tokens + args.chat_answer_tokens) + 64
    cache = sk.init_cache(params, 1, max(longest, args.system_tokens + args.question_tokens) + args.new_tokens + 16,
                          num_blocks=args.pool_blocks)
    _, cache = sk.generate(params, cache, tokens(rng, 8, params.config.vocab_size), max_new_tokens=2)
    res = {}
    for case, fn in (("shared_system_prompt", shared_system_prompt), ("chat", chat), ("no_overlap", no_overlap)):
        for attempt in ("warm-up (compiles every bucket)", "measured"):
            log(f"{name}: {case}: {attempt}")
            res[case], cache = fn(params, cache.clear(), args, np.random.default_rng(0))  # generate
            # donates its cache: keep the returned one
    return res


def render(res: dict[str, Any], args) -> str:
    lines = [f"SmolLM2-135M-Instruct f32, batch 1, block size 16; (a) {args.system_tokens}-token system prompt"
             f" + {args.requests} x {args.question_tokens}-token questions; (b) {args.turns}-turn chat"
             f" ({args.question_tokens}-token messages, {args.chat_answer_tokens}-token answers); (c) "
             f"{args.requests} unrelated {args.system_tokens + args.question_tokens}-token prompts", "",
             "| model | case | TTFT without cache | TTFT with cache | speed-up | hit rate |", "|---|---|---|---|---|---|"]
    for name, r in res["models"].items():
        a, b, c = r["shared_system_prompt"], r["chat"], r["no_overlap"]
        lines.append(f"| {name} | (a) first request | {1e3 * a['without']['first_s']:.0f} ms | "
                     f"{1e3 * a['with']['first_s']:.0f} ms | | |")
        lines.append(f"| {name} | (a) later requests (median) | {1e3 * a['without']['rest_median_s']:.0f} ms | "
                     f"{1e3 * a['with']['rest_median_s']:.0f} ms | {a['speedup_after_first']:.1f}x | "
                     f"{100 * a['with']['hit_rate']:.0f}% |")
        w, n = b["with"]["per_turn_s"], b["without"]["per_turn_s"]
        lines.append(f"| {name} | (b) chat turns 1-{len(w)} | " + " / ".join(f"{1e3 * x:.0f}" for x in n) + " ms | "
                     + " / ".join(f"{1e3 * x:.0f}" for x in w) + f" ms | {b['speedup_later_turns']:.1f}x (turns 2+) | "
                     f"{100 * b['with']['hit_rate']:.0f}% |")
        lines.append(f"| {name} | (c) 0% overlap: generate vs bare prefill | {1e3 * c['bare_prefill_s']:.0f} ms | "
                     f"{1e3 * c['with_index_s']:.0f} ms | overhead {100 * c['overhead']:+.1f}% | 0% |")
    lines += ["", "floors:"] + [f"  {'PASS' if ok else 'FAIL'}  {n}: {v}" for n, v, ok in res["floors"]]
    if res.get("other_cpu_share") is not None:
        lines.append(f"other processes used {100 * res['other_cpu_share']:.0f}% of the machine's CPU during the run")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--system-tokens", type=int, default=1024)
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--chat-answer-tokens", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=4, help="tokens generated per request in (a), (c)")
    p.add_argument("--layers", type=int, default=15, help="SwiftKV num_key_value_layers")
    p.add_argument("--pool-blocks", type=int, default=256)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    cpu = CpuShare()
    cpu.start()
    base, _ = sk.load(None, dtype=jnp.float32, progress=False, tokenizer=False)
    models = {"plain": base, f"SwiftKV L={args.layers}": sk.to_swiftkv(base, args.layers, 1)}
    res: dict[str, Any] = {"command": sys.argv, "models": {n: run_model(n, m, args) for n, m in models.items()}}
    res["floors"] = []
    for name, r in res["models"].items():
        s, o = r["shared_system_prompt"]["speedup_after_first"], r["no_overlap"]["overhead"]
        res["floors"] += [(f"{name}: (a) TTFT speed-up after the first request >= {FLOOR_SHARED_SPEEDUP:g}x",
                           f"{s:.1f}x", s >= FLOOR_SHARED_SPEEDUP),
                          (f"{name}: (c) overhead at 0% hits <= {FLOOR_OVERHEAD:.0%} of prefill",
                           f"{100 * o:+.1f}%", o <= FLOOR_OVERHEAD)]
    res["other_cpu_share"] = cpu.others()
    table = render(res, args)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix_cache.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "prefix_cache.txt").write_text(table + "\n")
    return 0 if all(ok for *_, ok in res["floors"]) else 1


if __name__ == "__main__":
    sys.exit(main())
