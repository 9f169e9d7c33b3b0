"""A real `swiftkv-jax serve` process on a free 127.0.0.1 port, for tests and benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

CACHE_DIR = Path(__file__).resolve().parent.parent / ".jax_cache"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Starts the server with `args` and waits until /health answers; `stop()` sends SIGTERM."""

    def __init__(self, model: str | Path, *args: str, log: Path, timeout: float = 600.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "SWIFTKV_JAX_CACHE": str(CACHE_DIR), "JAX_PLATFORMS": "cpu"}
        env.setdefault("SWIFTKV_JAX_TOKENIZER_CACHE", str(CACHE_DIR / "tokenizers"))
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "swiftkv_jax.cli", "serve", "--model", str(model),
             "--port", str(self.port), "--log-level", "warning", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the server did not start in {timeout} s:\n{self.output()}")
            time.sleep(0.25)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit status (killed after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
