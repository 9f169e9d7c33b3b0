"""One HTTP request's prompts run on the engine: submit, stream text, end with a finish reason.

`Generation` wraps the engine's RequestHandle for one prompt: it detokenises the tokens as they
arrive, applies stop strings (cancelling the request in the engine when one is hit), counts
usage, and cancels the request if its reader goes away (a dropped client), so its slot and
blocks are freed at the engine's next step. It never touches JAX: only submit() and the handle.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, AsyncIterator, Sequence

from ..runtime.engine import Engine
from ..runtime.handle import RequestHandle
from ..runtime.request import FinishReason, GenerateError, SamplingOptions
from ..text.detokenizer import IncrementalDetokenizer, StopStrings
from .metrics import Metrics
from .protocol import APIError, api_param

OPENAI_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
                  FinishReason.CANCELLED: "abort"}


@dataclasses.dataclass
class Piece:
    """Text made since the last piece, for choice `index`; `finish_reason` on its last piece."""

    index: int
    text: str
    finish_reason: str | None = None


class Generation:
    """One prompt in flight; iterate `pieces()` once."""

    def __init__(self, engine: Engine, tokenizer: Any, metrics: Metrics, index: int,
                 prompt_ids: list[int], options: SamplingOptions, stop_strings: Sequence[str]):
        self.index = index
        self.prompt_ids = prompt_ids
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopStrings(stop_strings)
        self._metrics = metrics
        try:
            self.handle: RequestHandle = engine.submit(prompt_ids, options)
        except GenerateError as err:
            raise APIError(400, str(err), api_param(err.param)) from err

    @property
    def cached_tokens(self) -> int:
        return self.handle.cached_tokens

    async def pieces(self) -> AsyncIterator[Piece]:
        """The answer as it is made; the last piece carries the finish reason."""
        try:
            async for token in self.handle:
                self.completion_tokens += 1
                text = self._stops.push(self._detok.add([token]))
                if self._stops.hit:
                    self.handle.cancel()
                    self.finish_reason = "stop"
                    yield Piece(self.index, text, "stop")
                    return
                if text:
                    yield Piece(self.index, text)
            reason = self.handle.finish_reason
            if reason is FinishReason.ERROR:
                raise APIError(500, f"the engine failed while running this request: {self.handle.error}")
            text = self._stops.push(self._detok.flush())
            self.finish_reason = "stop" if self._stops.hit else OPENAI_REASONS[reason]
            yield Piece(self.index, text + self._stops.flush(), self.finish_reason)
        finally:
            if not self.handle.done:
                self.handle.cancel()  # the reader left (a dropped client): free the slot
            self._metrics.observe(self.handle, self.finish_reason or "abort", self.completion_tokens)


def submit_all(engine: Engine, tokenizer: Any, metrics: Metrics, prompts: list[list[int]],
               options: list[SamplingOptions], stop_strings: Sequence[str]) -> list[Generation]:
    """Submits every prompt of one HTTP request, or none of them (an error cancels the rest)."""
    out: list[Generation] = []
    try:
        for i, (ids, opts) in enumerate(zip(prompts, options)):
            out.append(Generation(engine, tokenizer, metrics, i, ids, opts, stop_strings))
    except APIError:
        for g in out:
            g.handle.cancel()
        raise
    return out


async def merged(generations: list[Generation]) -> AsyncIterator[Piece]:
    """The pieces of several generations as they come (one HTTP request with several prompts)."""
    if len(generations) == 1:
        async for piece in generations[0].pieces():
            yield piece
        return
    queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()

    async def pump(g: Generation) -> None:
        try:
            async for piece in g.pieces():
                await queue.put(piece)
            await queue.put(None)
        except BaseException as err:  # noqa: BLE001 -- handed to the reader, which re-raises
            await queue.put(err)

    tasks = [asyncio.create_task(pump(g)) for g in generations]
    try:
        for _ in range(len(tasks)):
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
