"""A load generator over the OpenAI API (async, official `openai` client), bounded in count and time.

`run_load(url, model, requests, concurrency=8)` keeps `concurrency` streamed requests in flight;
`rate=r` sends them as a Poisson process of r per second instead. Only 127.0.0.1 is accepted. Each
request's time to first token, per-token times and token counts are taken from the stream as the
client sees it; `summarize` turns them into request throughput, tokens/s and TTFT/TPOT percentiles.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any
from urllib.parse import urlparse

import numpy as np
import openai


@dataclasses.dataclass(frozen=True)
class Request:
    """One request of a workload: a text prompt (completions) or messages (chat)."""

    max_tokens: int
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_tokens: int = 0  # counted by the workload's tokenizer (the same for every server)
    ignore_eos: bool = True
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # more body fields (logprobs, ...)
    group: str = ""  # a label summarize_groups splits the figures by


@dataclasses.dataclass
class Outcome:
    start: float
    first: float | None = None
    end: float | None = None
    tokens: int = 0  # content chunks (one token each for these servers) or usage's count
    error: str | None = None


async def _one(client: openai.AsyncOpenAI, model: str, req: Request) -> Outcome:
    out = Outcome(start=time.perf_counter())
    extra = {**({"ignore_eos": True} if req.ignore_eos else {}), **req.extra}
    try:
        if req.messages is not None:
            stream = await client.chat.completions.create(
                model=model, messages=req.messages, max_tokens=req.max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True}, extra_body=extra)
        else:
            stream = await client.completions.create(
                model=model, prompt=req.prompt, max_tokens=req.max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True}, extra_body=extra)
        counted = None
        async for chunk in stream:
            if getattr(chunk, "usage", None) is not None:
                counted = chunk.usage.completion_tokens
            if not chunk.choices:
                continue
            c = chunk.choices[0]
            text = c.delta.content if req.messages is not None else c.text
            if text:
                out.tokens += 1
                out.first = out.first or time.perf_counter()
        out.tokens = counted if counted is not None else out.tokens
    except openai.APIError as err:
        out.error = f"{type(err).__name__}: {err}"
    out.end = time.perf_counter()
    return out


async def _drive(url: str, model: str, requests: list[Request], concurrency: int | None,
                 rate: float | None, deadline_s: float, seed: int) -> tuple[list[Outcome], float]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0,
                                timeout=deadline_s)
    t0 = time.perf_counter()
    if rate is not None:  # open loop: Poisson arrivals
        gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(requests))

        async def later(delay: float, req: Request) -> Outcome:
            await asyncio.sleep(delay)
            return await _one(client, model, req)

        tasks = [later(float(t), r) for t, r in zip(np.cumsum(gaps), requests)]
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), deadline_s)
    else:  # closed loop: `concurrency` in flight
        queue = list(enumerate(requests))
        outcomes: list[Outcome | None] = [None] * len(requests)

        async def worker() -> None:
            while queue:
                i, req = queue.pop(0)
                outcomes[i] = await _one(client, model, req)

        await asyncio.wait_for(asyncio.gather(*[worker() for _ in range(concurrency or 1)]), deadline_s)
    wall = time.perf_counter() - t0
    await client.close()
    return list(outcomes), wall


def run_load(url: str, model: str, requests: list[Request], *, concurrency: int | None = 8,
             rate: float | None = None, deadline_s: float = 1800.0, seed: int = 0) -> dict[str, Any]:
    """Sends `requests` and returns `summarize`'s figures; refuses anything but 127.0.0.1."""
    if urlparse(url).hostname not in ("127.0.0.1", "localhost"):
        raise ValueError(f"the load generator only talks to 127.0.0.1, not {url}")
    outcomes, wall = asyncio.run(_drive(url, model, requests, concurrency, rate, deadline_s, seed))
    res = summarize(requests, outcomes, wall)
    if any(r.group for r in requests):  # each group's own figures (over the same wall time)
        pairs = lambda g: zip(*[(r, o) for r, o in zip(requests, outcomes) if r.group == g])
        res["groups"] = {g: summarize(*pairs(g), wall) for g in sorted({r.group for r in requests})}
    return res


def summarize(requests: list[Request], outcomes: list[Outcome], wall: float) -> dict[str, Any]:
    ok = [(r, o) for r, o in zip(requests, outcomes) if o.error is None and o.first is not None]
    ttft = [o.first - o.start for _, o in ok]
    tpot = [(o.end - o.first) / (o.tokens - 1) for _, o in ok if o.tokens > 1]
    prompt = sum(r.prompt_tokens for r, _ in ok)
    generated = sum(o.tokens for _, o in ok)
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None
    return {"requests": len(requests), "ok": len(ok), "errors": [o.error for o in outcomes if o.error][:3],
            "wall_s": wall, "req_per_s": len(ok) / wall, "prompt_tokens": prompt,
            "generated_tokens": generated, "total_tok_s": (prompt + generated) / wall,
            "output_tok_s": generated / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99)}
