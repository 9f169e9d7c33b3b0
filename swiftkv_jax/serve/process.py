"""A server in a child process on a free 127.0.0.1 port: for tests, benchmarks and notebooks.

`ServerProcess.swiftkv(model, *flags)` starts `swiftkv-jax serve`; `ServerProcess(argv, port)`
any OpenAI-compatible server (a peer in a benchmark). Both wait until the server answers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Runs `argv` (which must listen on 127.0.0.1:`port`), waits until GET `ready_path` answers
    200, and keeps its output in `log`; `stop()` sends SIGTERM and returns the exit status."""

    def __init__(self, argv: Sequence[str], port: int, *, log: Path, ready_path: str = "/health",
                 env: dict[str, str] | None = None, timeout: float = 900.0):
        self.port, self.url, self.log = port, f"http://127.0.0.1:{port}", Path(log)
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(list(argv), stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while not self._ready(ready_path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the server did not answer within {timeout} s:\n{self.output()}")
            time.sleep(0.25)

    @classmethod
    def swiftkv(cls, model: str | Path | None, *flags: str, log: Path, env: dict[str, str] | None = None,
                timeout: float = 900.0) -> "ServerProcess":
        """`swiftkv-jax serve --model MODEL FLAGS` (model None: the default model)."""
        port = free_port()
        argv = [sys.executable, "-m", "swiftkv_jax.cli", "serve", "--port", str(port),
                *(["--model", str(model)] if model is not None else []), *flags]
        return cls(argv, port, log=log, env=env, timeout=timeout)

    def _ready(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def output(self) -> str:
        """What the server has printed so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit status (killed after `timeout` seconds)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
