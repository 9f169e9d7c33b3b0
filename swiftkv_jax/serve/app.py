"""The OpenAI-compatible HTTP API (FastAPI) over a running Engine.

Routes: GET /health, GET /metrics, GET /v1/models, POST /v1/completions, POST
/v1/chat/completions (JSON or server-sent events with `stream`). Every error is OpenAI's error
body with its HTTP status; a bad request is refused before it reaches the engine, so it never
disturbs the requests that are running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime.engine import Engine
from ..text.grammar import GrammarError, Grammars
from ..text.tokenization import encode_text, has_chat_template, render_chat
from .generation import Generation, Piece, merged, submit_all
from .limits import MAX_BODY_BYTES, MAX_QUEUE
from .logprobs import CompletionLogprobs, TokenTexts, chat_logprobs
from .metrics import CONTENT_TYPE, Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, by Content-Length or as it arrives."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            err = APIError(413, f"the request body is {int(length)} bytes; this server takes at most "
                                f"{self.limit}")
            return await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise APIError(413, f"the request body is over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def create_app(engine: Engine, tokenizer: Any, *, model_name: str, api_key: str | None = None,
               max_queue: int = MAX_QUEUE, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app; it starts the engine's background loop on start-up and stops it on shut-down
    (requests still running then end as cancelled)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop(cancel=True)

    app = FastAPI(title="swiftkv-jax", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    metrics = Metrics(engine.stats)
    created = int(time.time())
    config = engine.params.config

    # -- errors: OpenAI's body, always ---------------------------------------------------------

    def error_response(err: APIError) -> JSONResponse:
        metrics.errors.labels(str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, where = f"the body is not valid JSON ({first.get('ctx', {}).get('error', message)})", []
        elif where:
            message = f"{'.'.join(where)}: {message}"
        return error_response(APIError(400, message, where[0] if where else None))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(err.status_code, str(err.detail)))

    @app.exception_handler(Exception)
    async def on_crash(_: Request, err: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(err).__name__}: {err}"))

    # -- checks shared by the endpoints --------------------------------------------------------

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer "
                                "<key>' with the key this server was started with", code="invalid_api_key")

    def known_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model '{name}' does not exist here; this server serves "
                                f"'{model_name}' (GET /v1/models)", "model", "model_not_found")

    def admit(body: Any) -> None:
        known_model(body.model)
        body.check_supported()
        if engine.num_waiting >= max_queue:
            raise APIError(429, f"the server's queue is full ({max_queue} requests waiting); retry "
                                "later", code="queue_full")

    def max_tokens_for(asked: int | None, prompt_len: int, param: str = "prompt") -> int:
        """max_tokens as asked, or (not given) what the context has left, as vLLM does."""
        if asked is not None:
            return asked
        left = engine.max_length - prompt_len
        if left < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens and the context holds "
                                f"{engine.max_length}; shorten it", param)
        return left

    # -- routes --------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        ok = engine.running
        return JSONResponse({"status": "ok" if ok else "stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    def prometheus() -> Response:  # sync: FastAPI runs it on a thread (stats waits for a step)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "swiftkv-jax", "max_model_len": engine.max_length}]}

    def chat_ids(messages: list[dict[str, str]], generation_prompt: bool = True) -> list[int]:
        if not has_chat_template(tokenizer):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions")
        return encode_text(tokenizer, render_chat(tokenizer, messages, generation_prompt=generation_prompt))

    @app.post("/tokenize", dependencies=[Depends(authorized)])
    async def tokenize(body: TokenizeRequest) -> dict:
        """vLLM's /tokenize: the ids /v1/completions (prompt) or /v1/chat/completions (messages)
        would run, their count and the context length."""
        known_model(body.model)
        body.check_supported()
        ids = (tokenizer.encode(body.prompt) if body.prompt is not None
               else chat_ids(body.chat(), body.add_generation_prompt))
        return {"count": len(ids), "max_model_len": engine.max_length, "tokens": ids}

    @app.post("/detokenize", dependencies=[Depends(authorized)])
    async def detokenize(body: DetokenizeRequest) -> dict:
        """vLLM's /detokenize: the text of token ids (special tokens kept)."""
        known_model(body.model)
        vocab = engine.params.config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    texts = TokenTexts(tokenizer)
    grammars = Grammars(tokenizer, config.vocab_size, config.eos_token_ids)

    async def constraints_for(body: Any, count: int) -> list | None:
        """One grammar matcher per choice for a body asking for structured output (else None);
        built off the event loop (the first builds the tokenizer's trie, ~0.4 s)."""
        asked = body.grammar()
        if asked is None:
            return None
        name, grammar = asked
        try:
            return await asyncio.to_thread(lambda: [grammars.constraint(grammar) for _ in range(count)])
        except GrammarError as err:
            raise APIError(400, f"{name}: {err}", name) from err

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        admit(body)
        given = body.prompts()
        prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in given]
        out_lp, prompt_lp = body.engine_logprobs()
        per = body.choices()
        opts = [body.options(max_tokens_for(body.max_tokens, len(ids)), config, copy=j, logprobs=out_lp,
                             prompt_logprobs=prompt_lp) for ids in prompts for j in range(per)]
        grammar = await constraints_for(body, len(opts))
        gens = submit_all(engine, tokenizer, metrics, [ids for ids in prompts for _ in range(per)], opts,
                          body.stop_strings(), grammar)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": model_name}
        echoes = [p if isinstance(p, str) else tokenizer.decode(p) for p in given] if body.echo else None
        names = TokenTexts.as_ids if body.return_tokens_as_token_ids else texts
        logs: dict[int, CompletionLogprobs] = {}  # each choice's, built as its pieces arrive

        def choice_logprobs(g: Generation, first: bool, ids: list[int], lps: list) -> dict | None:
            """The logprobs of these tokens, after the prompt's (echo) on a choice's first chunk."""
            if body.logprobs is None:
                return None
            if first:
                logs[g.index] = CompletionLogprobs(names)
            log = logs[g.index]
            mark = len(log.tokens)
            if first and body.echo:
                log.add(g.prompt_ids, g.handle.prompt_logprobs or [None] * len(g.prompt_ids))
            log.add(ids, lps)
            return log.body(mark)

        if body.stream:
            started: set[int] = set()

            def chunk(p: Piece) -> dict:
                first = p.index not in started
                started.add(p.index)
                prefix = echoes[p.index // per] if body.echo and first else ""
                lp = choice_logprobs(gens[p.index], first, p.token_ids, p.logprobs)
                return {"choices": [{"index": p.index, "text": prefix + p.text,
                                     "finish_reason": p.finish_reason, "logprobs": lp}]}
            return _sse(head, gens, chunk, body.include_usage(), opening=None)
        got = await _collect(request, gens)
        choices = []
        for g, text in zip(gens, got):
            prefix = echoes[g.index // per] if body.echo else ""
            lp = choice_logprobs(g, True, *g.output_logprobs())
            choices.append({"index": g.index, "text": prefix + text, "finish_reason": g.finish_reason,
                            "logprobs": lp})
        if per > body.n:  # best_of: each prompt's n most likely candidates (cumulative logprob)
            ranked = []
            for i in range(len(prompts)):
                group = sorted(range(i * per, (i + 1) * per), key=lambda c: -gens[c].cumulative_logprob())
                ranked += [{**choices[c], "index": i * body.n + r} for r, c in enumerate(group[:body.n])]
            choices = ranked
        return JSONResponse({**head, "choices": choices, "usage": _usage(gens)})

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        admit(body)
        ids = chat_ids(body.chat())
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = max_tokens_for(asked, len(ids), "messages")
        options = [body.options(max_tokens, config, copy=j, logprobs=body.engine_logprobs())
                   for j in range(body.n)]
        grammar = await constraints_for(body, body.n)
        gens = submit_all(engine, tokenizer, metrics, [ids] * body.n, options, body.stop_strings(), grammar)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": model_name}

        names = TokenTexts.as_ids if body.return_tokens_as_token_ids else texts

        def logprobs_of(ids: list[int], lps: list) -> dict | None:
            return {"content": chat_logprobs(names, ids, lps)} if body.logprobs else None

        if body.stream:
            def chunk(p: Piece) -> dict:
                delta = {} if p.finish_reason and not p.text else {"content": p.text}
                return {"choices": [{"index": p.index, "delta": delta, "finish_reason": p.finish_reason,
                                     "logprobs": logprobs_of(p.token_ids, p.logprobs)}]}
            opening = {"choices": [{"index": g.index, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None, "logprobs": None} for g in gens]}
            return _sse({**head, "object": "chat.completion.chunk"}, gens, chunk, body.include_usage(),
                        opening)
        got = await _collect(request, gens)
        return JSONResponse({**head, "choices": [{
            "index": g.index, "message": {"role": "assistant", "content": text},
            "finish_reason": g.finish_reason,
            "logprobs": logprobs_of(*g.output_logprobs())}
            for g, text in zip(gens, got)], "usage": _usage(gens)})

    return app


def _usage(gens: list[Generation]) -> dict:
    prompt = sum(len(g.prompt_ids) for g in gens)
    completion = sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(g.cached_tokens for g in gens)}}


async def _collect(request: Request, gens: list[Generation]) -> list[str]:
    """Every generation's whole text; cancels them all if the client disconnects meanwhile."""
    texts: dict[int, list[str]] = {g.index: [] for g in gens}
    reader = asyncio.ensure_future(_read_all(gens, texts))
    try:
        while not reader.done():
            await asyncio.wait([reader], timeout=0.5)
            if not reader.done() and await request.is_disconnected():
                reader.cancel()
                raise APIError(499, "the client disconnected")
        reader.result()
    finally:
        if not reader.done():
            reader.cancel()
    return ["".join(texts[g.index]) for g in gens]


async def _read_all(gens: list[Generation], texts: dict[int, list[str]]) -> None:
    async for piece in merged(gens):
        texts[piece.index].append(piece.text)


def _sse(head: dict, gens: list[Generation], chunk: Callable[[Piece], dict], include_usage: bool,
         opening: dict | None) -> StreamingResponse:
    """Server-sent events as OpenAI sends them: one `data: {json}` per piece, an optional usage
    chunk, then `data: [DONE]`; an engine failure mid-stream is sent as an error event."""

    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    usage_field = {"usage": None} if include_usage else {}

    async def events() -> AsyncIterator[str]:
        try:
            if opening is not None:
                yield event({**head, **opening, **usage_field})
            async for piece in merged(gens):
                if piece.text or piece.token_ids:  # the finish reason goes in a chunk of its own (OpenAI's)
                    text = dataclasses.replace(piece, finish_reason=None)
                    yield event({**head, **chunk(text), **usage_field})
                if piece.finish_reason is not None:
                    yield event({**head, **chunk(Piece(piece.index, "", piece.finish_reason)), **usage_field})
            if include_usage:
                yield event({**head, "choices": [], "usage": _usage(gens)})
        except APIError as err:
            yield event(err.body())
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
