"""generate(): one batch of prompts, start to end, on the engine's jitted steps (steps.py).

The rows' prompts are prefilled together in chunks (a power-of-two bucket up to 256 tokens, so a
long prompt pads less than one chunk), then the whole decode runs as one lax.while_loop. Prompt
lengths, max_new_tokens, sampling values and stop ids are traced arrays, so a new prompt inside a
chunk bucket or new sampling settings never recompile. For a stream of requests that start and
end independently, use the Engine (engine.py), which runs the same steps.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..model.paged_cache import blocks_needed
from ..model.params import Params
from .cache import KVCache, init_cache
from .prefix_cache import admit, register
from .request import FinishReason, GenerateError, SamplingOptions, check_prompt, check_room
from .sampling import SamplingParams
from .shapes import DEFAULT_CHUNK_SIZE, chunk_bucket, length_bucket
from .steps import decode, first_tokens, namespace_of, prefill, request_keys, to_host

STREAM_TOKENS = 8  # decode steps per XLA loop when a streamer receives the tokens


def prefill_bucket(length: int, max_length: int) -> int:
    """Padded length of a prefill chunk of `length` tokens: the next power of two >= MIN_CHUNK,
    capped at the chunk size and the cache size."""
    return min(chunk_bucket(length, DEFAULT_CHUNK_SIZE), max_length)


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated batch of prompts, laid out for the cache's rows."""

    rows: list[list[int]]
    tokens: np.ndarray  # [cache rows, max_length] int32 prompts, zero padded
    lengths: np.ndarray  # [cache rows] int32, 0 for unused rows
    blocks: np.ndarray  # [cache rows] int32, blocks each row needs for prompt + new tokens
    single: bool


def _as_rows(prompt: Sequence[int] | Sequence[Sequence[int]]) -> tuple[list[list[int]], bool]:
    if hasattr(prompt, "keys") and "input_ids" in prompt:  # a tokenizer's output (transformers 5's
        prompt = prompt["input_ids"]  # apply_chat_template returns one): its token ids
    if isinstance(prompt, (str, bytes)):
        raise GenerateError("prompt must be token ids (a list of ints or a list of lists); "
                            "tokenize text first, e.g. tokenizer.encode(text)")
    if isinstance(prompt, (np.ndarray, jax.Array)):
        prompt = np.asarray(prompt).tolist()
    prompt = list(prompt)
    if not prompt:
        raise GenerateError("prompt is empty: give at least one token id")
    single = not isinstance(prompt[0], (list, tuple, np.ndarray))
    rows = [prompt] if single else [list(np.asarray(r).tolist()) for r in prompt]
    return rows, single


def make_request(params: Params, cache: KVCache, prompt, max_new_tokens: int) -> Request:
    """Validates prompts against the model and the cache."""
    rows, single = _as_rows(prompt)
    vocab = params.config.vocab_size
    if any(x.is_deleted() for x in jax.tree.leaves(cache)):
        raise GenerateError("this cache was donated to an earlier generate() call and its memory now "
                            "belongs to the cache that call returned: use `out, cache = generate(...)`")
    if len(rows) > cache.batch_size:
        raise GenerateError(f"{len(rows)} prompts but the cache holds {cache.batch_size} rows; "
                            f"make the cache with init_cache(params, batch_size={len(rows)}, ...)")
    rows = [check_prompt(row, vocab, f"prompt {i}") for i, row in enumerate(rows)]
    for i, row in enumerate(rows):
        check_room(len(row), max_new_tokens, cache.max_length, name=f"prompt {i}",
                   budget="max_new_tokens", holder="the cache holds {} per row",
                   fix="make a larger cache (init_cache(..., max_length=...)) or ask for fewer tokens")
    tokens = np.zeros((cache.batch_size, cache.max_length), np.int32)
    lengths = np.zeros((cache.batch_size,), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
        lengths[i] = len(row)
    blocks = np.where(lengths > 0, blocks_needed(lengths + max_new_tokens, cache.block_size), 0)
    return Request(rows, tokens, lengths, blocks.astype(np.int32), single)


def _admit(cache: KVCache, req: Request, namespace: jax.Array) -> tuple[KVCache, np.ndarray]:
    """Looks up each row's cached prefix and allocates its blocks; the cache rows then hold the
    cached prefixes. Raises, with the cache unchanged, when the pool cannot hold the request."""
    index, table, hit, ok = admit(cache.index, cache.block_table, jnp.asarray(req.tokens),
                                  jnp.asarray(req.lengths), jnp.asarray(req.blocks), namespace)
    if not bool(to_host(ok)):
        raise GenerateError(
            f"the KV pool has {cache.num_blocks} blocks of {cache.block_size} tokens but this request "
            f"needs {int(req.blocks.sum())} (before reuse of cached prefixes); make the cache with more "
            "blocks (init_cache(..., num_blocks=... or pool_bytes=...)) or send fewer or shorter rows")
    hit = to_host(hit)
    lengths = jnp.asarray(hit)
    if isinstance(cache.lengths.sharding, jax.sharding.NamedSharding):  # stays split over rows
        lengths = jax.device_put(hit, cache.lengths.sharding)
    return dataclasses.replace(cache, index=index, block_table=table, lengths=lengths), hit


def generate(params: Params, cache: KVCache | None, prompt, *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_ids: Sequence[int] | None = None, timings: dict[str, float] | None = None,
             streamer: Callable[[list[list[int]]], None] | None = None):
    """Generates a continuation of `prompt` (token ids, or a batch of lists of different lengths;
    a tokenizer's output with `input_ids` is read as its ids).

    `temperature` 0 is greedy; `top_k` 0 and `top_p` 1 switch those filters off. Generation of a
    row stops after `max_new_tokens` or at a stop id (default: the model's eos ids), which is not
    returned. `cache` may be None (one is made to fit, its length rounded up to a power of two). Returns (ids, cache): ids is a list of
    ints for a single prompt, a list of lists for a batch; the cache holds the rows' K/V.
    Pass the returned cache to the next call: a prompt that begins like an earlier prompt or
    answer reuses its cached blocks instead of recomputing them (see cache.stats()).
    A `timings` dict, if given, receives prefill_s (time to first logits, including the prefix
    lookup), cached_tokens and decode_s. A `streamer`, if given, is called with each row's new
    tokens (a list per row) as they are made: the first token after prefill, then every
    STREAM_TOKENS (the decode then runs as XLA loops of that many steps; same tokens).
    """
    if not isinstance(params, Params):
        raise GenerateError("params must be swiftkv_jax Params (from swiftkv_jax.load or init_params)")
    if int(max_new_tokens) < 1:
        raise GenerateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    options = SamplingOptions(int(max_new_tokens), temperature, top_k, top_p, seed,
                              None if stop_ids is None else tuple(stop_ids)).checked(params.config)
    if cache is None:
        rows, _ = _as_rows(prompt)
        # Sized up to a power of two, like the prefill buckets: other prompt lengths and token
        # budgets in the same bucket reuse the compiled steps instead of compiling new shapes.
        cache = init_cache(params, len(rows), length_bucket(max(map(len, rows)) + int(max_new_tokens)))
    req = make_request(params, cache, prompt, int(max_new_tokens))
    namespace = namespace_of(params.weights)
    t0 = time.perf_counter()
    cache, hit = _admit(cache, req, namespace)
    logits, cache = prefill_chunked(params, cache, req.tokens, hit, req.lengths)
    sampling = SamplingParams.make(temperature, top_k, top_p)
    keys = request_keys([options.seed] * cache.batch_size, np.arange(cache.batch_size))
    first = to_host(first_tokens(logits, sampling, keys))
    if timings is not None:
        timings["prefill_s"] = time.perf_counter() - t0
        timings["cached_tokens"] = int(hit.sum())
        t0 = time.perf_counter()
    stop_arr = jnp.asarray(np.tile(options.stop_row(), (cache.batch_size, 1)))
    finish = [options.first_token_finish(int(t)) for t in first]
    budget = np.array([int(max_new_tokens) if n > 0 and f is None else 0
                       for n, f in zip(req.lengths, finish)], np.int32)
    ids = [[] if finish[i] is FinishReason.STOP else [int(first[i])] for i in range(len(req.rows))]
    if streamer is not None:
        streamer([list(row) for row in ids])
    # Each decode call runs up to `steps` tokens per row in one while_loop: all of them at once,
    # or STREAM_TOKENS at a time for a streamer (rows that ended get no budget for the next call).
    steps = STREAM_TOKENS if streamer is not None else int(max_new_tokens) - 1
    out_len = STREAM_TOKENS if streamer is not None else cache.max_length
    token, produced = jnp.asarray(first), np.ones((cache.batch_size,), np.int32)  # token 0: prefill's
    while budget.any():
        result, cache = decode(params, cache, None, token, jnp.asarray(produced), jnp.asarray(budget),
                               sampling, keys, stop_arr, jnp.int32(steps), out_len=out_len)
        out, counts = to_host(result.out), to_host(result.counts)
        new = [out[i, :counts[i] - produced[i]].tolist() if budget[i] else []
               for i in range(len(req.rows))]
        for i, row in enumerate(new):
            ids[i] += row
        if streamer is None:  # one loop ran every step the budget allows
            break
        streamer(new)
        done = to_host(result.done)
        token, produced, budget = result.token, counts, np.where(done, 0, budget).astype(np.int32)
    if timings is not None:
        timings["decode_s"] = time.perf_counter() - t0
    # Register the rows' full blocks (prompt and answer) so later requests can reuse them.
    written = req.tokens.copy()
    for i, row in enumerate(req.rows):
        written[i, len(row):len(row) + len(ids[i])] = ids[i]
    cache = dataclasses.replace(cache, index=register(
        cache.index, cache.block_table, jnp.asarray(written), cache.lengths,
        jnp.asarray(req.blocks), namespace))
    return (ids[0] if req.single else ids), cache


def prefill_chunked(params: Params, cache: KVCache, tokens: np.ndarray, start: np.ndarray,
                    lengths: np.ndarray) -> tuple[jax.Array, KVCache]:
    """Prefills tokens[b, start[b]:lengths[b]] of every row (all rows in each step, in chunks of
    at most DEFAULT_CHUNK_SIZE) after the start[b] tokens the row already holds; returns each
    row's last-prompt-token logits [rows, V] and the cache."""
    pos, remaining = np.asarray(start).copy(), np.asarray(lengths) - np.asarray(start)
    last = None
    while remaining.max() > 0:
        width = prefill_bucket(int(remaining.max()), cache.max_length)
        n = np.minimum(remaining, width)
        chunk = np.zeros((cache.batch_size, width), np.int32)
        for i in np.flatnonzero(n):
            chunk[i, :n[i]] = tokens[i, pos[i]:pos[i] + n[i]]
        logits, cache = prefill(params, cache, jnp.asarray(chunk), jnp.asarray(n.astype(np.int32)))
        ends = jnp.asarray((n > 0) & (n == remaining))[:, None]
        last = logits if last is None else jnp.where(ends, logits, last)
        pos, remaining = pos + n, remaining - n
    return last, cache
