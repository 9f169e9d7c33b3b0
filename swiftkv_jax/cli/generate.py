"""`swiftkv-jax generate`: answers one prompt, printed as it is made, with time to first token and
decode speed. The first run of a shape compiles; later runs read the persistent compilation cache
(and the GGUF's dequantised copy, io/weights_cache.py)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

from .common import STARTED, add_mesh_args, add_model_args, load_with_tokenizer, mesh_of


def add_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="answer a prompt with a (SwiftKV) Llama")
    p.add_argument("prompt")
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    p.add_argument("--compare-swiftkv-off", action="store_true",
                   help="for a SwiftKV model: also time prefill with SwiftKV off, show the saving")
    p.add_argument("--verbose", action="store_true", help="print where start-up time went")
    add_mesh_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    t_imports = time.perf_counter()
    from ..runtime import generation
    from ..text.detokenizer import IncrementalDetokenizer
    from ..text.tokenization import encode_prompt

    t_load = time.perf_counter()
    params, tokenizer = load_with_tokenizer(args, "generate", mesh=mesh_of(args))
    t_loaded = time.perf_counter()
    ids = encode_prompt(tokenizer, args.prompt, chat=not args.no_chat_template, system=args.system)
    text = IncrementalDetokenizer(tokenizer)
    arrivals: list[float] = []  # when each token reached us

    def show(new: list[list[int]]) -> None:
        arrivals.extend([time.perf_counter()] * len(new[0]))
        print(text.add(new[0]), end="", flush=True)

    t0 = time.perf_counter()
    out, _ = generation.generate(params, None, ids, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 seed=args.seed, streamer=show)
    print(text.flush())
    if args.compare_swiftkv_off:
        print_prefill_saving(params, ids)
    rate = steady_decode_rate(arrivals)
    first = (arrivals[0] if arrivals else time.perf_counter()) - t0
    print(f"[{len(ids)} prompt tokens, {len(out)} new | first token {first:.2f} s (compiling or reading "
          "the compilation cache included)" + (f" | decode {rate:.1f} tokens/s" if rate else "") + "]",
          file=sys.stderr)
    if args.verbose:
        print(f"[start-up: Python and the command line {t_imports - STARTED:.1f} s, importing JAX and "
              f"the library {t_load - t_imports:.1f} s, weights and tokenizer {t_loaded - t_load:.1f} s; "
              f"first token {t0 + first - STARTED:.1f} s and the whole answer "
              f"{time.perf_counter() - STARTED:.1f} s after start]", file=sys.stderr)
    return 0


def steady_decode_rate(token_times: Sequence[float]) -> float | None:
    """Decode tokens/s once the decode program runs: tokens arrive in groups (one per decode
    loop); the first group is the prefill's token and the second paid the decode program's
    compilation or cache read, so the rate is taken from there to the last group (None when
    there are too few groups)."""
    groups = sorted(set(token_times))
    if len(groups) < 3:
        return None
    return sum(t > groups[1] for t in token_times) / (groups[-1] - groups[1])


def print_prefill_saving(params: Any, ids: list[int], repeats: int = 3) -> None:
    """Times prefill of `ids` with SwiftKV on and off (the base model in the same weights)."""
    from ..model.swiftkv import swiftkv_off
    from ..runtime.cache import init_cache
    from ..runtime.generation import generate

    if not params.config.swiftkv:
        print("[--compare-swiftkv-off: this model is a plain Llama; nothing to compare]", file=sys.stderr)
        return
    best = {}
    for name, p in (("on", params), ("off", swiftkv_off(params))):
        cache = init_cache(p, 1, len(ids) + 1)
        times = []
        for _ in range(repeats + 1):  # the first run compiles
            t: dict[str, float] = {}
            _, cache = generate(p, cache.clear(), ids, max_new_tokens=1, timings=t)
            times.append(t["prefill_s"])
        best[name] = min(times[1:])
    cfg = params.config
    print(f"[prefill of {len(ids)} tokens: SwiftKV on {best['on'] * 1e3:.1f} ms, off "
          f"{best['off'] * 1e3:.1f} ms: {best['off'] / best['on']:.2f}x faster, "
          f"{100 * (1 - best['on'] / best['off']):.0f}% saved (L={cfg.num_key_value_layers} of "
          f"{cfg.num_layers}, g={cfg.key_value_group_size})]", file=sys.stderr)
