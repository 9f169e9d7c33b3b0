"""`swiftkv-jax serve`: the OpenAI-compatible server (swiftkv_jax/serve/) on an engine."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..runtime.shapes import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_DECODE_STEPS,
    DEFAULT_GRAMMAR_DECODE_STEPS,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MAX_SLOTS,
)
from ..serve.limits import DEFAULT_HOST, DEFAULT_PORT, MAX_BODY_BYTES, MAX_QUEUE, SHUTDOWN_TIMEOUT_S
from .common import add_mesh_args, add_model_args, load_with_tokenizer, mesh_of

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming, "
                       "/metrics) on the continuous-batching engine")
    add_model_args(p)
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the model file's name)")
    p.add_argument("--max-slots", type=int, default=DEFAULT_MAX_SLOTS, help="requests decoded together")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                   help="prompt + output tokens per request")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                   help="prompt tokens prefilled per step")
    p.add_argument("--decode-steps", type=int, default=DEFAULT_DECODE_STEPS,
                   help="decode tokens per engine step while no prompt is being prefilled")
    p.add_argument("--grammar-decode-steps", type=int, default=DEFAULT_GRAMMAR_DECODE_STEPS,
                   help="the same while a structured-output request runs (it takes one token per step)")
    p.add_argument("--pool-bytes", type=int, default=None,
                   help="KV pool size (default: every slot at max-length)")
    p.add_argument("--no-prefix-cache", action="store_true", help="never reuse cached prompt blocks")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (also $SWIFTKV_JAX_API_KEY)")
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE, help="waiting requests before 429")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger bodies get 413")
    p.add_argument("--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT_S,
                   help="on SIGTERM, seconds running requests get to finish before they are cancelled")
    p.add_argument("--warmup", choices=("background", "first", "none"), default="background",
                   help="compile every step shape on a background thread while requests are already "
                        "served (default: ready in seconds), all of them before listening (first: no "
                        "request ever waits for a compile; benchmarks), or never (none: each shape "
                        "compiles when a request first needs it)")
    p.add_argument("--no-warmup", dest="warmup", action="store_const", const="none",
                   help="the same as --warmup none")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_mesh_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime.engine import Engine
    from ..serve import serve

    params, tokenizer = load_with_tokenizer(args, "serve", mesh=mesh_of(args))
    engine = Engine(params, max_slots=args.max_slots, max_length=args.max_length,
                    chunk_size=args.chunk_size, pool_bytes=args.pool_bytes,
                    prefix_cache=not args.no_prefix_cache, decode_steps=args.decode_steps,
                    grammar_decode_steps=args.grammar_decode_steps)

    def report(seconds: float) -> None:
        print(f"warm-up (every step shape compiled, or read from the compilation cache) took "
              f"{seconds:.1f} s", file=sys.stderr, flush=True)

    if args.warmup == "first":
        print("compiling the engine's steps before listening ...", file=sys.stderr, flush=True)
        report(engine.warmup())
    elif args.warmup == "background":  # requests are served meanwhile; warm-up yields to them
        engine.warmup_in_background(report)
    name = args.served_model_name or (Path(args.model).stem if args.model else DEFAULT_MODEL_NAME)
    serve(engine, tokenizer, model_name=name, host=args.host, port=args.port,
          api_key=args.api_key or os.environ.get("SWIFTKV_JAX_API_KEY"), max_queue=args.max_queue,
          max_body_bytes=args.max_body_bytes, shutdown_timeout=args.shutdown_timeout,
          log_level=args.log_level)
    return 0
