"""`swiftkv-jax serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on the Engine.

The HTTP layer only translates the OpenAI API into engine requests (submit, stream, cancel);
it never touches JAX.
"""

from .app import create_app
from .run import serve

__all__ = ["create_app", "serve"]
