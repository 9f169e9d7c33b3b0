"""The serving engine: continuous batching over cache slots, chunked prefill, streamed tokens.

`Engine(params, max_slots=8, max_length=2048, ...)` owns one paged KV cache whose rows are slots.
`submit(prompt_ids, SamplingOptions(...))` returns a RequestHandle at once; each `step()` then
  1. ends cancelled requests (their slots and blocks are freed, written blocks stay cached);
  2. admits waiting requests into free slots as the pool and the step's token budget allow
     (longest cached prefix first: the prefix index on device), first come first served;
  3. while prompts are waiting to be prefilled: one mixed forward pass of one chunk (at most
     `chunk_size` prompt tokens in all) and one decode token for every running request (steps.mixed:
     chunked prefill as in vLLM / Sarathi-Serve; the decode tokens ride in the chunk's matmuls);
     the chunk's full blocks are published at once, so a concurrent request with the same system
     prompt reuses them; a row whose prompt is done samples its first token;
     otherwise: up to `decode_steps` decode steps for every running slot in one jitted while_loop;
  4. delivers the new tokens and ends finished requests.
A long prompt therefore delays each token of a running request by at most one chunk's time.
`start()` runs the steps on a background thread (the way a server uses it); without it, reading
a handle drives the steps. The device work is the same jitted steps generate() uses (steps.py).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import statistics
import threading
import time
from typing import Any, Callable
from typing import Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np

from ..model.paged_cache import blocks_needed
from ..model.params import Params
from .cache import DEFAULT_BLOCK_SIZE, KVCache, init_cache
from .handle import RequestHandle
from .prefix_cache import admit, publish, release
from .prefix_cache import stats as index_stats
from .request import MAX_STOP_IDS, FinishReason, GenerateError, SamplingOptions, check_prompt, check_room
from .sampling import SamplingParams
from .scheduler import Phase, Scheduler, Sequence
from .shapes import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_DECODE_STEPS,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MAX_SLOTS,
    MIN_CHUNK,
    chunk_widths,
    row_bucket,
    row_buckets,
)
from .steps import DecodeResult, decode, install, mixed, namespace_of, request_keys, to_host

log = logging.getLogger(__name__)

JITTED_STEPS = (mixed, decode, install, admit, publish, release)


def compilations() -> int:
    """Programs compiled so far for the engine's steps (a count tests compare before and after)."""
    return sum(f._cache_size() for f in JITTED_STEPS)


class Engine:
    """Serves a stream of requests on one model; see the module docstring for a step's work.

    max_slots: requests decoded together (cache rows). max_length: prompt + output tokens one
    request may hold. num_blocks / pool_bytes: the KV pool shared by all slots and the prefix
    cache (default: every slot full). chunk_size: prompt tokens per step. decode_steps: decode
    tokens per step when no prompt is being prefilled (tokens reach readers in groups of up to
    this many; while one is, each step decodes one token per request). prefix_cache False:
    no request reuses another's blocks (each gets its own namespace; for measuring the cache).
    """

    def __init__(self, params: Params, *, max_slots: int = DEFAULT_MAX_SLOTS,
                 max_length: int = DEFAULT_MAX_LENGTH, num_blocks: int | None = None,
                 pool_bytes: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, decode_steps: int = DEFAULT_DECODE_STEPS,
                 prefix_cache: bool = True):
        if not isinstance(params, Params):
            raise GenerateError("params must be swiftkv_jax Params (from swiftkv_jax.load or init_params)")
        if chunk_size < MIN_CHUNK or chunk_size & (chunk_size - 1):
            raise GenerateError(f"chunk_size must be a power of two >= {MIN_CHUNK}, got {chunk_size}")
        if decode_steps < 1:
            raise GenerateError(f"decode_steps must be >= 1, got {decode_steps}")
        self.params = params
        self.cache: KVCache = init_cache(params, max_slots, max_length, block_size=block_size,
                                         num_blocks=num_blocks, pool_bytes=pool_bytes)
        self._geometry = dict(batch_size=max_slots, max_length=max_length, block_size=block_size,
                              num_blocks=self.cache.num_blocks)
        self.max_slots, self.max_length = max_slots, self.cache.max_length
        self.chunk_size, self.decode_steps = chunk_size, decode_steps
        self._namespace = namespace_of(params.weights)
        self.prefix_cache = prefix_cache
        self._scheduler = Scheduler(max_slots, chunk_size, block_size)
        self._ids = itertools.count()
        self._step_lock = threading.RLock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._counters = collections.Counter()
        self._finished: collections.deque[RequestHandle] = collections.deque(maxlen=2048)

    # -- submitting --------------------------------------------------------------------------------

    def submit(self, prompt_ids: Seq[int], sampling: SamplingOptions | None = None) -> RequestHandle:
        """Queues a request and returns its handle at once. Raises GenerateError, and queues
        nothing, for a bad prompt or options, or a request that could never fit this engine."""
        if self._stopping:
            raise GenerateError("the engine is stopped; make a new Engine to submit more requests")
        cfg = self.params.config
        prompt = check_prompt(prompt_ids, cfg.vocab_size)
        options = (sampling or SamplingOptions()).checked(cfg)
        check_room(len(prompt), options.max_tokens, self.max_length,
                   fix="shorten the prompt, ask for fewer tokens, or make the Engine with a larger "
                       "max_length")
        blocks = blocks_needed(len(prompt) + options.max_tokens, self.cache.block_size)
        if blocks > self.cache.num_blocks:
            raise GenerateError(
                f"the request needs {blocks} KV blocks but the engine's pool has "
                f"{self.cache.num_blocks}; give the Engine more num_blocks or pool_bytes", "max_tokens")
        handle = RequestHandle(self, next(self._ids), prompt)
        key = np.asarray(request_keys([options.seed])[0])
        namespace = self._namespace if self.prefix_cache else self._namespace ^ jnp.uint32(
            (handle.id * 0x9E3779B1 + 1) & 0xFFFFFFFF)
        self._scheduler.add(Sequence(handle, np.asarray(prompt, np.int32), options, key, blocks,
                                     namespace))
        self._wake.set()
        return handle

    # -- running -----------------------------------------------------------------------------------

    def wake(self) -> None:
        """Tells the background loop there is new work (a submit or a cancel)."""
        self._wake.set()

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot (a server refuses more past its queue limit)."""
        return len(self._scheduler.waiting)

    @property
    def running(self) -> bool:
        """Whether a background thread runs the steps (start())."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Engine":
        """Runs the steps on a background thread until stop()."""
        if not self.running:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="swiftkv-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, cancel: bool = True) -> None:
        """Stops accepting requests and the background thread; with `cancel`, every unfinished
        request ends as cancelled, else the running ones are finished first."""
        self._stopping = True
        if cancel:
            for seq in self._scheduler.active() + list(self._scheduler.waiting):
                seq.handle.cancel()
        elif not self.running:
            while self._scheduler.has_work():
                self.step()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if cancel:
            self.step()  # ends what was cancelled

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self) -> None:
        while True:
            if self._stopping and not self._scheduler.has_work():
                return
            if not self.step():
                self._wake.wait(0.05)
                self._wake.clear()

    def step(self) -> bool:
        """One scheduler step (see the module docstring). Returns whether there was work."""
        with self._step_lock:
            self._end_cancelled()
            if not self._scheduler.has_work():
                return False
            try:
                decoding = self._scheduler.decoding()
                rows, width = self._scheduler.plan_prefill(self._admit)
                if rows:
                    self._mixed(rows, width, decoding)
                elif decoding:
                    self._decode(decoding, self.decode_steps)
                self._counters["steps"] += 1
            except Exception as err:  # noqa: BLE001 -- the engine must outlive any one failure
                self._recover(err)
            return True

    # -- the step's parts --------------------------------------------------------------------------

    def _admit(self, seq: Sequence, slot: int) -> bool:
        """Looks up the request's cached prefix and reserves its blocks in `slot`; False (nothing
        changed) when the pool cannot hold it now."""
        cache = self.cache
        tokens = np.zeros((1, self.max_length), np.int32)
        tokens[0, :len(seq.prompt)] = seq.prompt
        index, table, hit, ok = admit(cache.index, jnp.zeros((1, cache.block_table.shape[1]), jnp.int32),
                                      jnp.asarray(tokens), jnp.asarray([len(seq.prompt)], jnp.int32),
                                      jnp.asarray([seq.blocks], jnp.int32), seq.namespace)
        if not bool(to_host(ok)):
            return False
        cached = int(to_host(hit)[0])
        self.cache = install(dataclasses.replace(cache, index=index), jnp.asarray([slot], jnp.int32),
                             table, jnp.asarray([cached], jnp.int32))
        seq.table = to_host(table)[0]
        seq.pos = seq.kv_len = cached
        seq.handle.cached_tokens = cached
        return True

    def _slot_ids(self, seqs: list[Sequence], rows: int) -> np.ndarray:
        """[rows] slot ids of `seqs`, padded with an out-of-range id (that row's work is dropped)."""
        ids = np.full((rows,), self.max_slots, np.int32)
        ids[:len(seqs)] = [s.slot for s in seqs]
        return ids

    def _sampling(self, *groups: tuple[list[Sequence], int]) -> tuple[SamplingParams, jax.Array]:
        """Per-row sampling settings and request keys of `groups` of (sequences, rows) laid one
        after another, each padded to its rows with greedy rows."""
        n = sum(rows for _, rows in groups)
        temperature, top_k, top_p = np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32)
        keys = np.zeros((n, 2), np.uint32)
        start = 0
        for seqs, rows in groups:
            for i, s in enumerate(seqs, start):
                o = s.options
                temperature[i], top_k[i], top_p[i], keys[i] = o.temperature, o.top_k, o.top_p, s.key
            start += rows
        return SamplingParams.make(temperature, top_k, top_p), jnp.asarray(keys)

    def _chunk(self, rows: list[tuple[Sequence, int]], width: int, pad_rows: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The step's prompt chunk: tokens [P, width], real tokens per row [P], slot ids [P], with
        P the row bucket of len(rows), at least `pad_rows`."""
        p = row_bucket(max(len(rows), pad_rows), self.max_slots)
        chunk = np.zeros((p, width), np.int32)
        num_new = np.zeros((p,), np.int32)
        for i, (seq, n) in enumerate(rows):
            chunk[i, :n] = seq.prompt[seq.pos:seq.pos + n]
            num_new[i] = n
        return chunk, num_new, self._slot_ids([s for s, _ in rows], p)

    def _prefilled(self, rows: list[tuple[Sequence, int]], first: jax.Array) -> None:
        """After a chunk: advances and publishes each row; a row whose prompt is done takes its
        first token (from `first` [P], read only when one is needed) and starts decoding."""
        for seq, n in rows:
            seq.pos += n
            seq.kv_len = seq.pos
            self._publish(seq)
        self._counters["prefill_tokens"] += sum(n for _, n in rows)
        if not any(seq.prompt_left == 0 for seq, _ in rows):
            return
        tokens = to_host(first)
        for i, (seq, _) in enumerate(rows):
            if seq.prompt_left:
                continue
            self._scheduler.prefill_done(seq)
            token = int(tokens[i])
            finish = seq.options.first_token_finish(token)
            if finish is not FinishReason.STOP:
                seq.last = token
                self._emit(seq, [token])
            if finish is not None:
                self._end(seq, finish)

    def _decode_rows(self, seqs: list[Sequence], rows: int) -> dict[str, np.ndarray]:
        """The decode inputs of `seqs` padded to `rows`: last token, tokens so far, budget, stops."""
        token, counts, budget = np.zeros(rows, np.int32), np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        stops = np.full((rows, MAX_STOP_IDS), -1, np.int32)
        for i, s in enumerate(seqs):
            token[i], counts[i], budget[i] = s.last, len(s.tokens), s.options.max_tokens
            stops[i] = s.options.stop_row()
        return dict(token=token, counts=counts, max_tokens=budget, stop_ids=stops)

    def _decode(self, seqs: list[Sequence], max_steps: int) -> None:
        r = row_bucket(len(seqs), self.max_slots)
        inputs = self._decode_rows(seqs, r)
        sampling, keys = self._sampling((seqs, r))
        steps = min(max_steps, int((inputs["max_tokens"] - inputs["counts"]).max()))
        result, self.cache = decode(self.params, self.cache, jnp.asarray(self._slot_ids(seqs, r)),
                                    inputs["token"], inputs["counts"], inputs["max_tokens"], sampling,
                                    keys, inputs["stop_ids"], jnp.int32(steps), out_len=self.decode_steps)
        self._decoded(seqs, inputs["counts"], result)

    def _mixed(self, rows: list[tuple[Sequence, int]], width: int, decoding: list[Sequence],
               pad_rows: int = 1) -> None:
        """One chunk of `rows` and one token for every decoding row (maybe none) in a single
        forward pass (steps.mixed). The decode part is always max_slots rows wide (padding rows
        cost a token of matmul each), so there is one program per chunk shape."""
        chunk, num_new, slots = self._chunk(rows, width, pad_rows)
        inputs = self._decode_rows(decoding, self.max_slots)
        sampling, keys = self._sampling(([s for s, _ in rows], len(slots)), (decoding, self.max_slots))
        first, result, self.cache = mixed(
            self.params, self.cache, jnp.asarray(slots), jnp.asarray(chunk), jnp.asarray(num_new),
            jnp.asarray(self._slot_ids(decoding, self.max_slots)), inputs["token"], inputs["counts"],
            inputs["max_tokens"], sampling, keys, inputs["stop_ids"])
        self._decoded(decoding, inputs["counts"], result)
        self._prefilled(rows, first)

    def _decoded(self, seqs: list[Sequence], counts: np.ndarray, result: DecodeResult) -> None:
        """Delivers a decode call's new tokens and ends the rows that finished."""
        out, new_counts, done, stopped, lengths, last = (to_host(x) for x in (
            result.out, result.counts, result.done, result.stopped, result.lengths, result.token))
        for i, seq in enumerate(seqs):
            n = int(new_counts[i] - counts[i])
            seq.kv_len, seq.last = int(lengths[i]), int(last[i])
            self._counters["decode_tokens"] += n
            self._emit(seq, out[i, :n].tolist())
            if done[i]:
                self._end(seq, FinishReason.STOP if stopped[i] else FinishReason.LENGTH)

    def _emit(self, seq: Sequence, tokens: list[int]) -> None:
        """New tokens of a request: its own record, then its caller's handle."""
        seq.tokens.extend(tokens)
        seq.handle.deliver(tokens)

    def _publish(self, seq: Sequence) -> None:
        """Registers the request's written full blocks in the prefix index."""
        self.cache = dataclasses.replace(self.cache, index=publish(
            self.cache.index, jnp.asarray(seq.table[None]), jnp.asarray(seq.written(self.max_length)[None]),
            jnp.asarray([seq.kv_len], jnp.int32), seq.namespace))

    def _end(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """Ends a request: publishes what it wrote, releases its blocks, frees its slot."""
        if seq.table is not None and not any(x.is_deleted() for x in jax.tree.leaves(self.cache)):
            self._publish(seq)
            self.cache = dataclasses.replace(self.cache, index=release(
                self.cache.index, jnp.asarray(seq.table[None]), jnp.asarray([seq.blocks], jnp.int32)))
        self._scheduler.remove(seq)
        seq.table = None
        seq.handle.deliver([], reason, error)
        self._finished.append(seq.handle)
        self._counters[f"finished_{reason.value}"] += 1

    def _end_cancelled(self) -> None:
        with self._scheduler.lock:
            waiting = [s for s in self._scheduler.waiting if s.handle.cancel_requested]
        for seq in waiting + [s for s in self._scheduler.active() if s.handle.cancel_requested]:
            self._end(seq, FinishReason.CANCELLED)

    def _recover(self, err: Exception) -> None:
        """After a failed step: the requests that step ran end with the error; if the failure took
        the cache with it (a donated buffer), every running request does and the cache is rebuilt."""
        log.exception("engine step failed")
        message = f"{type(err).__name__}: {err}"
        lost = any(x.is_deleted() for x in jax.tree.leaves(self.cache))
        for seq in self._scheduler.active():
            self._end(seq, FinishReason.ERROR, message)
        if lost:
            self.cache = init_cache(self.params, **self._geometry)

    # -- observing ---------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Requests running and waiting, tokens per step, prefix hit rate, KV blocks, TTFT/TPOT."""
        with self._step_lock:
            index = index_stats(self.cache.index)
            active = self._scheduler.active()
            waiting = len(self._scheduler.waiting)
            finished = list(self._finished)
        c = self._counters
        ttft = [h.ttft_s for h in finished if h.ttft_s is not None]
        tpot = [h.tpot_s for h in finished if h.tpot_s is not None]
        pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None
        return {
            "running": len(active), "prefilling": sum(s.phase is Phase.PREFILL for s in active),
            "waiting": waiting, "steps": c["steps"], "prefill_tokens": c["prefill_tokens"],
            "decode_tokens": c["decode_tokens"],
            "tokens_per_step": (c["prefill_tokens"] + c["decode_tokens"]) / c["steps"] if c["steps"] else 0.0,
            "finished": {r.value: c[f"finished_{r.value}"] for r in FinishReason},
            "prefix_hit_rate": index["hit_rate"], "prefix_hit_tokens": index["hit_tokens"],
            "blocks_total": self.cache.num_blocks, "blocks_in_use": index["blocks_in_use"],
            "blocks_cached": index["blocks_cached"], "blocks_free": index["blocks_free"],
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
            "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
        }

    def warmup(self) -> float:
        """Compiles every shape the steps can take (mixed steps of each chunk shape, decode row
        buckets, admission), so no request waits for a compile; returns the seconds it took.
        Warm-up yields to requests: while the background loop has work (a chat's first message
        sent during warm-up), it waits, so the request only pays for the programs it uses."""
        t0 = time.perf_counter()
        for compile_one in self._warmup_programs():
            while self.running and self._scheduler.has_work():
                time.sleep(0.02)
            if self._stopping:  # the engine is shutting down: the rest is not needed
                break
            with self._step_lock:
                compile_one()
        jax.block_until_ready(self.cache)
        return time.perf_counter() - t0

    def warmup_in_background(self, on_done: Callable[[float], None] | None = None) -> threading.Thread:
        """Runs warmup() on a daemon thread (requests are served meanwhile: warm-up yields to them)
        and calls `on_done(seconds)` when it ends; returns the thread."""
        def run() -> None:
            seconds = self.warmup()
            if on_done is not None:
                on_done(seconds)

        thread = threading.Thread(target=run, name="swiftkv-warmup", daemon=True)
        thread.start()
        return thread

    def _warmup_programs(self) -> list[Callable[[], None]]:
        """One thunk per program shape; each runs it on padding only (nothing is written)."""
        programs: list[Callable[[], None]] = [
            functools.partial(self._mixed, [], width, [], pad_rows=rows)
            for width in chunk_widths(self.chunk_size)
            for rows in row_buckets(min(self.max_slots, self.chunk_size // width))]
        programs += [functools.partial(self._decode_padding, rows) for rows in row_buckets(self.max_slots)]
        return programs + [self._index_padding]

    def _decode_padding(self, rows: int) -> None:
        zeros = jnp.zeros((rows,), jnp.int32)
        _, self.cache = decode(self.params, self.cache, jnp.full((rows,), self.max_slots, jnp.int32),
                               zeros, zeros, zeros, *self._sampling(([], rows)),
                               jnp.full((rows, MAX_STOP_IDS), -1, jnp.int32), jnp.int32(1),
                               out_len=self.decode_steps)

    def _index_padding(self) -> None:
        """Admission, install, publish and release of nothing: the index stays as it was."""
        empty = jnp.zeros((1, self.cache.block_table.shape[1]), jnp.int32)
        tokens, none = jnp.zeros((1, self.max_length), jnp.int32), jnp.zeros((1,), jnp.int32)
        _, table, _, _ = admit(self.cache.index, empty, tokens, none, none, self._namespace)
        self.cache = install(self.cache, jnp.full((1,), self.max_slots, jnp.int32), table, none)
        publish(self.cache.index, empty, tokens, none, self._namespace)
        release(self.cache.index, empty, none)
