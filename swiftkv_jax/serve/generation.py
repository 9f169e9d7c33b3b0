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

from ..runtime.constraint import Constraint
from ..runtime.engine import Engine
from ..runtime.handle import RequestHandle
from ..runtime.request import FinishReason, GenerateError, SamplingOptions, TokenLogprob
from ..text.detokenizer import IncrementalDetokenizer, StopStrings
from .metrics import Metrics
from .protocol import APIError, api_param

OPENAI_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
                  FinishReason.CANCELLED: "abort"}


@dataclasses.dataclass
class Piece:
    """Text made since the last piece, for choice `index`; `finish_reason` on its last piece;
    the tokens consumed since the last piece and (when the request asked) their logprobs."""

    index: int
    text: str
    finish_reason: str | None = None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)


class Generation:
    """One prompt in flight; iterate `pieces()` once."""

    def __init__(self, engine: Engine, tokenizer: Any, metrics: Metrics, index: int,
                 prompt_ids: list[int], options: SamplingOptions, stop_strings: Sequence[str],
                 constraint: Constraint | None = None):
        self.index = index
        self.prompt_ids = prompt_ids
        self.options = options
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopStrings(stop_strings)
        self._metrics = metrics
        try:
            self.handle: RequestHandle = engine.submit(prompt_ids, options, constraint)
        except GenerateError as err:
            raise APIError(400, str(err), api_param(err.param)) from err

    @property
    def cached_tokens(self) -> int:
        return self.handle.cached_tokens

    def _consumed(self, start: int, last: bool = False) -> tuple[list[int], list[TokenLogprob]]:
        """The tokens read since token `start` and, when the request has them, their logprobs;
        on the `last` piece of an answer that ended at a stop id, that id too (as vLLM lists it:
        it is no text, but lm-eval reads the entry after an echoed prompt)."""
        h, end = self.handle, self.completion_tokens
        if self.options.logprobs is None:
            return h.tokens[start:end], []
        ids, logprobs = h.tokens[start:end], h.logprobs[start:end]
        if last and h.stop_logprob is not None and self.finish_reason == "stop" and not self._stops.hit:
            ids, logprobs = ids + [h.stop_logprob[0]], logprobs + [h.stop_logprob[1]]
        return ids, logprobs

    def output_logprobs(self) -> tuple[list[int], list[TokenLogprob]]:
        """The whole answer's tokens and logprobs (after it ended), as its pieces listed them."""
        return self._consumed(0, last=True)

    async def pieces(self) -> AsyncIterator[Piece]:
        """The answer as it is made; the last piece carries the finish reason. Stop strings count
        only once min_tokens tokens are out (as the stop ids)."""
        sent = 0
        try:
            async for token in self.handle:
                self.completion_tokens += 1
                armed = self.completion_tokens > self.options.min_tokens
                text = self._stops.push(self._detok.add([token]), armed)
                if self._stops.hit:
                    self.handle.cancel()
                    self.finish_reason = "stop"
                    yield Piece(self.index, text, "stop", *self._consumed(sent))
                    return
                if text:
                    yield Piece(self.index, text, None, *self._consumed(sent))
                    sent = self.completion_tokens
            reason = self.handle.finish_reason
            if reason is FinishReason.ERROR:
                raise APIError(500, f"the engine failed while running this request: {self.handle.error}")
            text = self._stops.push(self._detok.flush())
            self.finish_reason = "stop" if self._stops.hit else OPENAI_REASONS[reason]
            yield Piece(self.index, text + self._stops.flush(), self.finish_reason,
                        *self._consumed(sent, True))
        finally:
            if not self.handle.done:
                self.handle.cancel()  # the reader left (a dropped client): free the slot
            self._metrics.observe(self.handle, self.finish_reason or "abort", self.completion_tokens)

    def cumulative_logprob(self) -> float:
        """The sum of the output tokens' logprobs (best_of ranks candidates by it)."""
        return sum(lp.logprob for lp in self.handle.logprobs[:self.completion_tokens])


def submit_all(engine: Engine, tokenizer: Any, metrics: Metrics, prompts: list[list[int]],
               options: list[SamplingOptions], stop_strings: Sequence[str],
               constraints: Sequence[Constraint | None] | None = None) -> list[Generation]:
    """Submits every prompt of one HTTP request, or none of them (an error cancels the rest)."""
    out: list[Generation] = []
    constraints = constraints or [None] * len(prompts)
    try:
        for i, (ids, opts, grammar) in enumerate(zip(prompts, options, constraints)):
            out.append(Generation(engine, tokenizer, metrics, i, ids, opts, stop_strings, grammar))
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
