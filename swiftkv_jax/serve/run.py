"""Runs the server: the engine's loop on a background thread beside uvicorn's event loop.

SIGTERM or Ctrl-C stops accepting connections, lets running requests finish for up to
`shutdown_timeout` seconds, cancels what is left, stops the engine and returns (exit status 0).
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

import uvicorn

from ..runtime.engine import Engine
from .app import create_app
from .limits import DEFAULT_HOST, DEFAULT_PORT, MAX_BODY_BYTES, MAX_QUEUE, SHUTDOWN_TIMEOUT_S

log = logging.getLogger("swiftkv_jax.serve")


def serve(engine: Engine, tokenizer: Any, *, model_name: str, host: str = DEFAULT_HOST,
          port: int = DEFAULT_PORT, api_key: str | None = None, max_queue: int = MAX_QUEUE,
          max_body_bytes: int = MAX_BODY_BYTES, shutdown_timeout: float = SHUTDOWN_TIMEOUT_S,
          log_level: str = "info") -> None:
    """Serves `engine` over HTTP until SIGTERM / SIGINT (binds 127.0.0.1 unless told otherwise)."""
    app = create_app(engine, tokenizer, model_name=model_name, api_key=api_key, max_queue=max_queue,
                     max_body_bytes=max_body_bytes)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout, lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; with these handlers in
    # place that is a no-op, so a clean shut-down exits 0 instead of dying by the signal.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"serving '{model_name}' at http://{host}:{port}/v1 (OpenAI API; metrics at /metrics)",
              file=sys.stderr, flush=True)
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
