"""The serving engine: continuous batching over cache slots, chunked prefill, streamed tokens.

`Engine(params, max_slots=8, max_length=2048, ...)` owns one paged KV cache whose rows are slots.
`submit(prompt_ids, SamplingOptions(...))` returns a RequestHandle at once; each `step()` then
  1. ends cancelled requests (their slots and blocks are freed, written blocks stay cached);
  2. the scheduler (scheduler.py, no JAX) admits waiting requests into free slots as the pool and
     the step's token budget allow, first come first served, and the runner (runner.py) looks up
     their cached prefixes on the device and writes their slots' state there;
  3. the scheduler plans the step, the runner executes it: while prompts are waiting to be
     prefilled, one mixed forward pass of one chunk (at most `chunk_size` prompt tokens in all)
     and one decode token for every running request (chunked prefill as in vLLM /
     Sarathi-Serve); the chunk's full blocks are published at once, so a concurrent request with
     the same system prompt reuses them; a row whose prompt is done samples its first token;
     otherwise: up to `decode_steps` decode steps for every running slot in one jitted while_loop;
  4. delivers the new tokens (fetched in one transfer) and ends finished requests.
A long prompt therefore delays each token of a running request by at most one chunk's time.
`start()` runs the steps on a background thread (the way a server uses it); without it, reading
a handle drives the steps. The decode loop is the one generate() runs (steps.py).
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
import numpy as np

from ..model.paged_cache import blocks_needed
from ..model.params import Params
from .cache import DEFAULT_BLOCK_SIZE, KVCache
from .constraint import Constraint
from .handle import RequestHandle
from .prefix_cache import stats as index_stats
from .request import FinishReason, GenerateError, SamplingOptions, check_prompt, check_room
from .runner import JITTED, Runner, StepResult
from .scheduler import Phase, Scheduler, Sequence, StepPlan
from .scoring import prompt_logprobs
from .shapes import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_DECODE_STEPS,
    DEFAULT_GRAMMAR_DECODE_STEPS,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MAX_SLOTS,
    MIN_CHUNK,
    chunk_widths,
    row_buckets,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Launched:
    """A step started on the device: its plan, its results (not fetched; None when it ran
    nothing), and which of its chunk rows completed their prompt."""

    plan: StepPlan
    out: jax.Array | None
    completed: list[bool]
    constrained: bool = False  # a grammar-constrained row took a token: its next mask needs it


STATS_WAIT_S = 0.25  # how long stats() waits for a running step or compile before reading around it


def compilations() -> int:
    """Programs compiled so far for the engine's steps (a count tests compare before and after)."""
    return sum(f._cache_size() for f in JITTED)


class Engine:
    """Serves a stream of requests on one model; see the module docstring for a step's work.

    max_slots: requests decoded together (cache rows). max_length: prompt + output tokens one
    request may hold. num_blocks / pool_bytes: the KV pool shared by all slots and the prefix
    cache (default: every slot full). chunk_size: prompt tokens per step. decode_steps: decode
    tokens per step when no prompt is being prefilled (tokens reach readers in groups of up to
    this many; while one is, each step decodes one token per request). grammar_decode_steps:
    the same while a grammar-constrained request runs (it takes one token per step, so fewer
    steps per loop get it its tokens sooner; runtime/constraint.py). prefix_cache False:
    nothing is cached or reused (the index only allocates; for measuring the cache).
    """

    def __init__(self, params: Params, *, max_slots: int = DEFAULT_MAX_SLOTS,
                 max_length: int = DEFAULT_MAX_LENGTH, num_blocks: int | None = None,
                 pool_bytes: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, decode_steps: int = DEFAULT_DECODE_STEPS,
                 prefix_cache: bool = True, grammar_decode_steps: int = DEFAULT_GRAMMAR_DECODE_STEPS):
        if not isinstance(params, Params):
            raise GenerateError("params must be swiftkv_jax Params (from swiftkv_jax.load or init_params)")
        if chunk_size < MIN_CHUNK or chunk_size & (chunk_size - 1):
            raise GenerateError(f"chunk_size must be a power of two >= {MIN_CHUNK}, got {chunk_size}")
        if decode_steps < 1 or grammar_decode_steps < 1:
            raise GenerateError(f"decode_steps and grammar_decode_steps must be >= 1, got {decode_steps} "
                                f"and {grammar_decode_steps}")
        self.params = params
        self._runner = Runner(params, max_slots, max_length, decode_steps, block_size=block_size,
                              num_blocks=num_blocks, pool_bytes=pool_bytes, prefix_cache=prefix_cache)
        self.max_slots, self.max_length = max_slots, self._runner.max_length
        self.chunk_size, self.decode_steps = chunk_size, decode_steps
        self.prefix_cache = prefix_cache
        self._scheduler = Scheduler(max_slots, chunk_size, block_size, self.cache.num_blocks,
                                    decode_steps, share_prefixes=prefix_cache,
                                    grammar_steps=min(grammar_decode_steps, decode_steps))
        self._ids = itertools.count()
        self._step_lock = threading.RLock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._counters = collections.Counter()
        self._finished: collections.deque[RequestHandle] = collections.deque(maxlen=2048)
        self._index_stats = index_stats(self.cache.index)  # the last prefix-index figures read
        self._masks: dict[int, np.ndarray] = {}  # constrained slots' next masks, sent before the next step

    @property
    def cache(self) -> KVCache:
        """The engine's KV cache (pools, block tables, prefix index)."""
        return self._runner.cache

    @cache.setter
    def cache(self, cache: KVCache) -> None:
        self._runner.cache = cache

    # -- submitting --------------------------------------------------------------------------------

    def submit(self, prompt_ids: Seq[int], sampling: SamplingOptions | None = None,
               constraint: Constraint | None = None) -> RequestHandle:
        """Queues a request and returns its handle at once. Raises GenerateError, and queues
        nothing, for a bad prompt or options, or a request that could never fit this engine.
        With a `constraint` (structured output, runtime/constraint.py) every token it draws is
        one the grammar allows, and it ends when the grammar is complete."""
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
        self._scheduler.add(Sequence(handle, np.asarray(prompt, np.int32), options, blocks,
                                     constraint=constraint))
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
        """The background loop runs one step ahead: it launches step n + 1 before it fetches and
        delivers step n, so the host's work (delivery, planning, dispatch) overlaps the device's.
        A request that ended in step n may still sit in step n + 1's rows: the device already
        counts it as done (its budget is spent), and its results there are ignored. A step in
        which a grammar-constrained row took a token is finished at once instead, so the row's
        next mask is ready for the very next step."""
        pending: _Launched | None = None
        while True:
            with self._step_lock:
                if self._stopping and pending is None and not self._scheduler.has_work():
                    return
                launched = self._launch()
                if pending is not None:
                    self._finish(pending)
                pending = launched
                if launched is not None and launched.constrained:
                    self._finish(launched)
                    pending = None
                    continue
            if pending is None:
                self._wake.wait(0.05)
                self._wake.clear()

    def step(self) -> bool:
        """One scheduler step (see the module docstring), its tokens delivered before it returns.
        Returns whether there was work."""
        with self._step_lock:
            launched = self._launch()
            if launched is not None:
                self._finish(launched)
            return launched is not None

    # -- a step: launched on the device, then finished on the host ---------------------------------

    def _launch(self) -> "_Launched | None":
        """Ends cancelled requests, admits waiting ones, plans the step and starts it on the
        device (not waiting for it); prompt positions advance at once. None: nothing to do."""
        self._end_cancelled()
        self._score_waiting()
        if not self._scheduler.has_work():
            return None
        try:
            admitted = self._scheduler.admit()
            if admitted:
                for seq, hit in zip(admitted, self._runner.admit(admitted)):
                    seq.pos = seq.handle.cached_tokens = hit
            if self._masks:
                self._runner.set_masks(self._masks)
                self._masks = {}
            plan = self._scheduler.plan()
            out = None if plan.empty else self._runner.launch(plan)
            for seq, n in plan.prefill:
                self._scheduler.prefilled(seq, n)
                self._counters["prefill_tokens"] += n
            sampled = [s for s, _ in plan.prefill if s.prompt_left == 0] + list(plan.decode)
            for seq in sampled:
                seq.held = seq.constraint is not None  # its next mask waits for this token
            self._counters["steps"] += 1
            return _Launched(plan, out, [seq.prompt_left == 0 for seq, _ in plan.prefill],
                             any(seq.held for seq in sampled))
        except Exception as err:  # noqa: BLE001 -- the engine must outlive any one failure
            self._recover(err)
            return _Launched(StepPlan(), None, [])

    def _finish(self, launched: "_Launched") -> None:
        """Fetches a launched step's results (one transfer), delivers its tokens and ends the
        requests that finished: the chunk's rows whose prompt it completed (their first token),
        then the decode rows. Requests that ended meanwhile (cancelled) are skipped."""
        if launched.out is None:
            return
        plan = launched.plan
        try:
            result = StepResult.fetch(launched.out)
            for i, (seq, _) in enumerate(plan.prefill):
                if launched.completed[i] and seq.phase is not Phase.ENDED:
                    self._delivered(seq, result, i)
            for i, seq in enumerate(plan.decode, self._runner.decode_row(plan)):
                if seq.phase is not Phase.ENDED:
                    self._counters["decode_tokens"] += self._delivered(seq, result, i)
        except Exception as err:  # noqa: BLE001
            self._recover(err)

    def _delivered(self, seq: Sequence, result: StepResult, i: int) -> int:
        """Hands row `i`'s new tokens to the request (ending it if it is done); returns how many."""
        tokens = result.tokens(i)
        seq.tokens.extend(tokens)
        wanted, logprobs = seq.options.logprobs, None
        if wanted is not None:
            logprobs = result.logprobs(i, wanted)
            if result.stopped(i):  # the stop id's logprob, as vLLM lists it (lm-eval reads it)
                seq.handle.stop_logprob = (result.stop_id(i), logprobs.pop())
        seq.handle.deliver(tokens, logprobs=logprobs)
        if result.done(i):
            self._end(seq, FinishReason.STOP if result.stopped(i) else FinishReason.LENGTH)
        elif seq.constraint is not None:
            self._constrain(seq, tokens)
        return len(tokens)

    def _constrain(self, seq: Sequence, tokens: list[int]) -> None:
        """Gives a constrained request's new tokens to its grammar, then queues its next mask
        (or ends it where the grammar is complete)."""
        try:
            for token in tokens:
                seq.constraint.accept(token)
            if seq.constraint.finished:
                self._end(seq, FinishReason.STOP)
                return
            self._masks[seq.slot] = seq.constraint.allowed()
        except Exception as err:  # noqa: BLE001 -- a grammar's failure ends its request, no other
            log.exception("a request's grammar failed")
            self._end(seq, FinishReason.ERROR, f"{type(err).__name__}: {err}")
            return
        seq.held = False

    def _end(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """Ends a request: publishes what it wrote, releases its blocks, frees its slot."""
        if seq.phase is Phase.ENDED:
            return
        if seq.phase is not Phase.WAITING and not self._runner.lost:
            self._runner.free(seq)
            self._masks.pop(seq.slot, None)  # never a stale mask for the slot's next request
        self._scheduler.remove(seq)
        seq.handle.deliver([], reason, error)
        self._finished.append(seq.handle)
        self._counters[f"finished_{reason.value}"] += 1

    def _score_waiting(self) -> None:
        """Prompt logprobs for the waiting requests that asked for them (scoring.py: a forward
        pass over each prompt, before its admission); a request with max_tokens 0 ends there."""
        with self._scheduler.lock:
            todo = [s for s in self._scheduler.waiting
                    if s.options.prompt_logprobs is not None and s.handle.prompt_logprobs is None]
        if not todo:
            return
        try:
            scored = prompt_logprobs(self.params, [s.prompt for s in todo],
                                     [s.options.prompt_logprobs for s in todo])
        except Exception:  # noqa: BLE001 -- score them one by one: only the one at fault fails
            scored = [self._score_alone(seq) for seq in todo]
        for seq, logprobs in zip(todo, scored):
            if logprobs is None:
                continue
            seq.handle.prompt_logprobs = logprobs
            self._counters["scored_tokens"] += len(seq.prompt)
            if seq.options.max_tokens == 0:
                self._end(seq, FinishReason.LENGTH)

    def _score_alone(self, seq: Sequence) -> list | None:
        """One request's prompt logprobs, or None after ending it with the error."""
        try:
            return prompt_logprobs(self.params, [seq.prompt], [seq.options.prompt_logprobs])[0]
        except Exception as err:  # noqa: BLE001 -- this request fails, no other
            log.exception("scoring a prompt failed")
            self._end(seq, FinishReason.ERROR, f"{type(err).__name__}: {err}")
            return None

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
        lost = self._runner.lost
        for seq in self._scheduler.active():
            self._end(seq, FinishReason.ERROR, message)
        if lost:
            self._runner.reset()

    # -- observing ---------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Requests running and waiting, tokens per step, prefix hit rate, KV blocks, TTFT/TPOT.

        Never waits long for the engine: when a step or a warm-up compile holds it for more than
        STATS_WAIT_S (a metrics scrape must not time out), the prefix-index figures are the last
        ones read and the rest is read as it stands."""
        got = self._step_lock.acquire(timeout=STATS_WAIT_S)
        try:
            if got:
                self._index_stats = index_stats(self.cache.index)
            index = self._index_stats
            active = self._scheduler.active()
            waiting = len(self._scheduler.waiting)
            finished = list(self._finished)
        finally:
            if got:
                self._step_lock.release()
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
        with self._step_lock:  # a step on another thread may be donating the cache right now
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
        runner = self._runner
        programs: list[Callable[[], None]] = [
            functools.partial(runner.warm_mixed, rows, width)
            for width in chunk_widths(self.chunk_size)
            for rows in row_buckets(min(self.max_slots, self.chunk_size // width))]
        programs += [functools.partial(runner.warm_decode, rows) for rows in row_buckets(self.max_slots)]
        return programs + [runner.warm_admission]
