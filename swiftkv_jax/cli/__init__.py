"""The `swiftkv-jax` command: generate text, chat, serve, convert weights, distill and evaluate
SwiftKV models.

Argument parsing and printing only, one module per command (each registers its subcommand and
runs it); the work is the library's. Importing this package loads no JAX: the console script
re-executes itself once (hugepages.py) before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import chat, convert, distill, generate, serve

__all__ = ["build_parser", "entry", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The `swiftkv-jax` argument parser, every subcommand and flag."""
    parser = argparse.ArgumentParser(prog="swiftkv-jax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_parser(sub)
    chat.add_parser(sub)
    serve.add_parser(sub)
    convert.add_parser(sub)
    distill.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs a subcommand; our errors print as one line with exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # our errors carry what to do; no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `swiftkv-jax` console script: main() in a process whose large buffers use huge pages
    (hugepages.py; re-executes itself once where that is possible)."""
    from .hugepages import reexec_with_huge_pages

    reexec_with_huge_pages(sys.orig_argv[1:])  # the interpreter's own arguments: keeps `-m swiftkv_jax.cli`
    sys.exit(main())
