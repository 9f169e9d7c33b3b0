"""A submitted request as its caller sees it: tokens as they are made, cancel, a finish reason.

The engine's scheduler delivers tokens from its thread; a caller reads them with a plain
iterator (blocking) or an async one (awaiting), or waits for the whole answer with result().
Without a background loop, reading drives the engine's steps itself.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import AsyncIterator, Iterator, Protocol

from .request import FinishReason, TokenLogprob

__all__ = ["Driver", "FinishReason", "RequestError", "RequestHandle"]


class Driver(Protocol):
    """What a handle needs of whatever runs its request (the Engine): a nudge after a cancel, and,
    when no background loop runs the steps, a step run by the reader itself."""

    @property
    def running(self) -> bool: ...

    def step(self) -> bool: ...

    def wake(self) -> None: ...


class RequestError(RuntimeError):
    """A request that ended with an error inside the engine (its message says which)."""


class RequestHandle:
    """One request in an engine: iterate it for its tokens; `finish_reason` once it ended."""

    def __init__(self, engine: Driver, request_id: int, prompt: list[int]):
        self.id = request_id
        self.prompt = prompt
        self.tokens: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self.cached_tokens = 0  # prompt tokens taken from the prefix cache
        self.logprobs: list[TokenLogprob] = []  # one per token, when the request asked for logprobs
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # when it asked for them
        self.stop_logprob: tuple[int, TokenLogprob] | None = None  # the stop id it drew (not a token)
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.token_times: list[float] = []  # perf_counter() when each token was delivered
        self.finished_at: float | None = None
        self._engine = engine
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._cancel = threading.Event()

    # -- the caller's side -----------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Whether the request has ended (any finish reason)."""
        return self.finish_reason is not None

    @property
    def ttft_s(self) -> float | None:
        """Seconds from submit to the first token (None before it)."""
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at

    @property
    def tpot_s(self) -> float | None:
        """Mean seconds between this request's tokens after the first (None for fewer than 2)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    def cancel(self) -> None:
        """Asks the engine to stop this request; it ends (finish reason cancelled) at the next step,
        and its slot and blocks are freed. Cancelling a finished request does nothing."""
        self._cancel.set()
        self._engine.wake()

    @property
    def cancel_requested(self) -> bool:
        """Whether cancel() was called (the engine ends the request at its next step)."""
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[int]:
        """The request's tokens, each as soon as it is made (blocks until then)."""
        seen = 0
        while True:
            with self._cond:
                while len(self.tokens) == seen and not self.done and self._engine.running:
                    self._cond.wait(0.1)
                new, done = self.tokens[seen:], self.done
            seen += len(new)
            yield from new
            if done and seen == len(self.tokens):
                return
            if not new and not self._engine.running:
                self._engine.step()

    async def __aiter__(self) -> AsyncIterator[int]:
        """The request's tokens as an async iterator (for an event loop: awaits, never blocks)."""
        loop = asyncio.get_running_loop()
        seen = 0
        while True:
            event = asyncio.Event()
            with self._cond:
                new, done = self.tokens[seen:], self.done
                if not new and not done:
                    self._waiters.append((loop, event))
            seen += len(new)
            for token in new:
                yield token
            if done and seen == len(self.tokens):
                return
            if not new:
                if self._engine.running:
                    await event.wait()
                else:
                    await asyncio.to_thread(self._engine.step)

    def result(self, timeout: float | None = None) -> list[int]:
        """All the request's tokens once it has ended; RequestError if it ended with an error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if not self._engine.running:
                self._engine.step()
                continue
            with self._cond:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
                self._cond.wait(0.1 if left is None else min(left, 0.1))
        if self.finish_reason is FinishReason.ERROR:
            raise RequestError(f"request {self.id} failed: {self.error}")
        return list(self.tokens)

    # -- the engine's side -----------------------------------------------------------------------

    def deliver(self, tokens: list[int], finish: FinishReason | None = None,
                 error: str | None = None, logprobs: list[TokenLogprob] | None = None) -> None:
        """Appends new tokens (and their logprobs, before a reader can see the tokens) and, if
        given, ends the request; wakes every reader."""
        now = time.perf_counter()
        with self._cond:
            if tokens and self.first_token_at is None:
                self.first_token_at = now
            self.logprobs.extend(logprobs or ())
            self.tokens.extend(tokens)
            self.token_times.extend([now] * len(tokens))
            if finish is not None and not self.done:
                self.finish_reason, self.error, self.finished_at = finish, error, now
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that reader's event loop has closed: nobody is waiting
                pass

    def __repr__(self) -> str:
        state = self.finish_reason.value if self.done else "running"
        return f"RequestHandle(id={self.id}, prompt={len(self.prompt)} tokens, " \
               f"{len(self.tokens)} out, {state})"
