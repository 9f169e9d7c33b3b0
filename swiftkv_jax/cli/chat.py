"""`swiftkv-jax chat`: an interactive conversation in the terminal (chat_session.py) on an engine
whose step shapes compile in the background while the user types."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..runtime.shapes import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_LENGTH
from .common import add_model_args, load_with_tokenizer


def add_parser(sub: Any) -> None:
    p = sub.add_parser("chat", help="an interactive conversation in the terminal: streamed, the chat "
                       "template, the conversation's prefix reused every turn; /reset, /stats")
    add_model_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest answer per turn")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                   help="the conversation's context; older exchanges are dropped past it")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                   help="prompt tokens prefilled per step")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="default: a fresh one per answer")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime.engine import Engine
    from ..runtime.request import SamplingOptions
    from ..text.tokenization import has_chat_template
    from .chat_session import ChatSession, run_chat

    params, tokenizer = load_with_tokenizer(args, "chat")
    if not has_chat_template(tokenizer):
        raise ValueError(f"{args.model} has no chat template; chat needs one (use `swiftkv-jax "
                         "generate --no-chat-template` for plain text completion)")
    engine = Engine(params, max_slots=1, max_length=args.max_length, chunk_size=args.chunk_size)
    options = SamplingOptions(max_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    session = ChatSession(engine, tokenizer, options, system=args.system)
    # Every step shape compiles (or loads from the compilation cache) while the user types the
    # first message; a message sent before it is done waits only for the programs it uses.
    engine.warmup_in_background()
    with engine:  # the steps run on the engine's thread, so Ctrl-C only stops the answer
        try:
            run_chat(session, sys.stdin, sys.stdout)
        except KeyboardInterrupt:
            print()
    return 0
