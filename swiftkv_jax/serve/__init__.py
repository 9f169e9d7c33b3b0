"""`swiftkv-jax serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on the Engine.

The HTTP layer only translates the OpenAI API into engine requests (submit, stream, cancel);
it never touches JAX. `create_app` and `serve` are imported on first use, so reading the
defaults (limits.py) loads neither FastAPI nor the engine.
"""

from __future__ import annotations

import importlib as _importlib

__all__ = ["create_app", "serve"]
_EXPORTS = {"create_app": "app", "serve": "run"}


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'swiftkv_jax.serve' has no attribute {name!r}")
    return getattr(_importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
