"""generate(): bucketed prefill, then the whole decode loop as one lax.while_loop in one jit.

Prompt lengths, max_new_tokens, sampling values and stop ids are traced arrays, so a new prompt
inside a length bucket or new sampling settings never recompile. The cache is donated to both
jitted steps, so XLA updates it in place.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .cache import KVCache, init_cache
from .model import forward
from .params import Params
from .prefix_cache import admit, register, weights_namespace
from .sampling import SamplingParams, sample

MIN_BUCKET = 16
MAX_STOP_IDS = 8  # stop ids are padded to this many so their number never recompiles


class GenerateError(ValueError):
    """A generate() request that cannot run as given; the message says what to change."""


def prefill_bucket(length: int, max_length: int) -> int:
    """Padded prompt length: the next power of two >= MIN_BUCKET, capped at the cache size."""
    return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), max_length)


@functools.partial(jax.jit, donate_argnames=("cache",))
def prefill(params: Params, cache: KVCache, tokens: jax.Array, num_new: jax.Array
            ) -> tuple[jax.Array, KVCache]:
    """Runs each row's uncached prompt tokens after its cached prefix (cache.lengths); returns
    the last-token logits [B, V]."""
    return forward(params, cache, tokens, num_new)


namespace_of = jax.jit(weights_namespace)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The state of the decode while_loop (all arrays, B = cache rows).

    step:   loop iteration; token `step` of every row's output is written next
    token:  [B] each row's last sampled token (the next step's input)
    done:   [B] rows that stopped (stop id, max_new_tokens, full cache, or batch padding)
    out:    [B, max_length] generated tokens, 0 after a row's end
    counts: [B] real tokens generated per row
    cache:  the KV cache, threaded through every step
    key:    the PRNG key of the next draw
    """

    step: jax.Array
    token: jax.Array
    done: jax.Array
    out: jax.Array
    counts: jax.Array
    cache: KVCache
    key: jax.Array


@functools.partial(jax.jit, donate_argnames=("cache",))
def decode(params: Params, cache: KVCache, logits: jax.Array, active: jax.Array, key: jax.Array,
           max_new_tokens: jax.Array, sampling: SamplingParams, stop_ids: jax.Array
           ) -> tuple[jax.Array, jax.Array, KVCache]:
    """Samples up to `max_new_tokens` per row from the prefill `logits`, in one while_loop.

    Returns tokens [B, cache.max_length] (the first `counts[b]` are real), counts [B], cache.
    A row stops after a token in `stop_ids` (not included in its output) or when it is not
    `active` (batch padding).
    """
    batch, capacity = cache.batch_size, cache.max_length

    def emit(s: DecodeState, logits: jax.Array) -> DecodeState:
        key, sub = jax.random.split(s.key)
        tok = sample(logits, sub, sampling)
        done = s.done | jnp.isin(tok, stop_ids)
        out = s.out.at[:, s.step].set(jnp.where(done, 0, tok))
        counts = s.counts + (~done)
        done = done | (counts >= max_new_tokens) | (s.cache.lengths >= capacity)
        return DecodeState(s.step + 1, tok, done, out, counts, s.cache, key)

    def cond(s: DecodeState) -> jax.Array:
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        logits, cache = forward(params, s.cache, s.token[:, None], (~s.done).astype(jnp.int32))
        return emit(dataclasses.replace(s, cache=cache), logits)

    start = DecodeState(jnp.int32(0), jnp.zeros((batch,), jnp.int32), ~active,
                        jnp.zeros((batch, capacity), jnp.int32), jnp.zeros((batch,), jnp.int32),
                        cache, key)
    end = jax.lax.while_loop(cond, body, emit(start, logits))
    return end.out, end.counts, end.cache


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
    for i, row in enumerate(rows):
        if len(row) == 0:
            raise GenerateError(f"prompt {i} is empty: every prompt needs at least one token id")
        if not all(isinstance(t, (int, np.integer)) for t in row):
            raise GenerateError(f"prompt {i} holds something other than integer token ids")
        bad = [t for t in row if not 0 <= t < vocab]
        if bad:
            raise GenerateError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): "
                                f"{bad[:5]}; was it tokenized for another model?")
        if len(row) + max_new_tokens > cache.max_length:
            raise GenerateError(
                f"prompt {i} has {len(row)} tokens; with max_new_tokens={max_new_tokens} it needs "
                f"{len(row) + max_new_tokens} cache positions but the cache holds {cache.max_length} "
                f"per row; make a larger cache (init_cache(..., max_length=...)) or ask for fewer tokens")
    tokens = np.zeros((cache.batch_size, cache.max_length), np.int32)
    lengths = np.zeros((cache.batch_size,), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
        lengths[i] = len(row)
    blocks = np.where(lengths > 0, -(-(lengths + max_new_tokens) // cache.block_size), 0)
    return Request(rows, tokens, lengths, blocks.astype(np.int32), single)


def _to_host(x: jax.Array) -> np.ndarray:
    """x as numpy; an array spread over several processes (multi-host mesh) is gathered first."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _admit(cache: KVCache, req: Request, namespace: jax.Array) -> tuple[KVCache, np.ndarray]:
    """Looks up each row's cached prefix and allocates its blocks; the cache rows then hold the
    cached prefixes. Raises, with the cache unchanged, when the pool cannot hold the request."""
    index, table, hit, ok = admit(cache.index, cache.block_table, jnp.asarray(req.tokens),
                                  jnp.asarray(req.lengths), jnp.asarray(req.blocks), namespace)
    if not bool(_to_host(ok)):
        raise GenerateError(
            f"the KV pool has {cache.num_blocks} blocks of {cache.block_size} tokens but this request "
            f"needs {int(req.blocks.sum())} (before reuse of cached prefixes); make the cache with more "
            "blocks (init_cache(..., num_blocks=... or pool_bytes=...)) or send fewer or shorter rows")
    hit = _to_host(hit)
    lengths = jnp.asarray(hit)
    if isinstance(cache.lengths.sharding, jax.sharding.NamedSharding):  # stays split over rows
        lengths = jax.device_put(hit, cache.lengths.sharding)
    return dataclasses.replace(cache, index=index, block_table=table, lengths=lengths), hit


def generate(params: Params, cache: KVCache | None, prompt, *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_ids: Sequence[int] | None = None, timings: dict[str, float] | None = None):
    """Generates a continuation of `prompt` (token ids, or a batch of lists of different lengths;
    a tokenizer's output with `input_ids` is read as its ids).

    `temperature` 0 is greedy; `top_k` 0 and `top_p` 1 switch those filters off. Generation of a
    row stops after `max_new_tokens` or at a stop id (default: the model's eos ids), which is not
    returned. `cache` may be None (one is made to fit, its length rounded up to a power of two). Returns (ids, cache): ids is a list of
    ints for a single prompt, a list of lists for a batch; the cache holds the rows' K/V.
    Pass the returned cache to the next call: a prompt that begins like an earlier prompt or
    answer reuses its cached blocks instead of recomputing them (see cache.stats()).
    A `timings` dict, if given, receives prefill_s (time to first logits, including the prefix
    lookup), cached_tokens and decode_s.
    """
    if not isinstance(params, Params):
        raise GenerateError("params must be swiftkv_jax Params (from swiftkv_jax.load or init_params)")
    if int(max_new_tokens) < 1:
        raise GenerateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise GenerateError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise GenerateError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise GenerateError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    stop = tuple(params.config.eos_token_ids if stop_ids is None else stop_ids)
    if len(stop) > MAX_STOP_IDS:
        raise GenerateError(f"at most {MAX_STOP_IDS} stop ids are supported, got {len(stop)}")
    if cache is None:
        rows, _ = _as_rows(prompt)
        # Sized up to a power of two, like the prefill buckets: other prompt lengths and token
        # budgets in the same bucket reuse the compiled steps instead of compiling new shapes.
        needed = max(len(r) for r in rows) + int(max_new_tokens)
        cache = init_cache(params, len(rows), max(MIN_BUCKET, 1 << (needed - 1).bit_length()))
    req = make_request(params, cache, prompt, int(max_new_tokens))
    namespace = namespace_of(params.weights)
    t0 = time.perf_counter()
    cache, hit = _admit(cache, req, namespace)
    suffix_lengths = req.lengths - hit
    bucket = prefill_bucket(int(suffix_lengths.max()), cache.max_length)
    suffix = np.zeros((cache.batch_size, bucket), np.int32)
    for i, row in enumerate(req.rows):
        suffix[i, :suffix_lengths[i]] = row[hit[i]:]
    logits, cache = prefill(params, cache, jnp.asarray(suffix), jnp.asarray(suffix_lengths))
    if timings is not None:
        logits.block_until_ready()
        timings["prefill_s"] = time.perf_counter() - t0
        timings["cached_tokens"] = int(hit.sum())
        t0 = time.perf_counter()
    stop_arr = np.full((MAX_STOP_IDS,), -1, np.int32)
    stop_arr[:len(stop)] = stop
    out, counts, cache = decode(
        params, cache, logits, jnp.asarray(req.lengths > 0), jax.random.PRNGKey(seed),
        jnp.int32(max_new_tokens), SamplingParams.make(temperature, top_k, top_p),
        jnp.asarray(stop_arr))
    out, counts = _to_host(out), _to_host(counts)
    if timings is not None:
        timings["decode_s"] = time.perf_counter() - t0
    ids = [out[i, :counts[i]].tolist() for i in range(len(req.rows))]
    # Register the rows' full blocks (prompt and answer) so later requests can reuse them.
    written = req.tokens.copy()
    for i, row in enumerate(req.rows):
        written[i, len(row):len(row) + counts[i]] = ids[i]
    cache = dataclasses.replace(cache, index=register(
        cache.index, cache.block_table, jnp.asarray(written), cache.lengths,
        jnp.asarray(req.blocks), namespace))
    return (ids[0] if req.single else ids), cache
