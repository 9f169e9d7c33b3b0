"""The engine's device side (vLLM's model runner; JetStream's insert / generate / free): it holds
the params, the KV cache and the per-slot state (slots.py), runs the scheduler's plans as jitted
programs over them, and hands the host each step's results in one transfer.

A step sends only which slots run (and, for a prefill chunk, how many prompt tokens each): the
prompt tokens, the tokens so far, budgets, stop ids, sampling values and keys are already on the
device, and the programs advance them there. Every program donates the cache and the state.

  admit:   looks up a request's cached prefix, reserves its blocks, installs its block table and
           writes its slot's state (one program per request; their hits come back together)
  mixed:   a prefill chunk (its tokens gathered from the slots' prompts on the device) and one
           decode token for every running slot in one forward pass; the chunk's full blocks are
           published at once; a row whose prompt is done takes its first token
  decode:  up to `steps` decode tokens for some slots (one step: no loop)
  free:    publishes a finished request's blocks and releases its references
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..model.forward import forward_packed
from ..model.params import Params
from .cache import KVCache, init_cache
from .logits import MAX_LOGPROBS, History, Logprobs, apply_rules, logprobs_of
from .prefix_cache import admit, publish, register
from .request import TokenLogprob
from .sampling import sample
from .scheduler import Sequence as Request
from .scheduler import StepPlan
from .shapes import row_bucket, row_buckets
from .slots import Admission, SlotState, empty_slots, insert, set_masks
from .steps import (
    DecodeState,
    RowRules,
    advance,
    decode_loop,
    decode_start,
    decode_step,
    finished,
    namespace_of,
    to_host,
    token_keys,
)

# Columns of a step's result row after its `out_len` tokens: tokens emitted, done, stopped at a stop id;
# then the tokens' log-probabilities (float32 bits): out_len drawn, out_len x K top ids, out_len x K top.
EMITTED, DONE, STOPPED = 0, 1, 2
FLAGS = 3


def _record(state: SlotState, slots: jax.Array, before: SlotState, counts: jax.Array,
            last: jax.Array, out: jax.Array, stopped: jax.Array) -> SlotState:
    """`state` with rows `slots` advanced: their last token, their count, and their new tokens
    (`out` [R, n], the first counts - before.counts real) written after what they held. A row that
    stopped at a stop id has its budget spent, so a step planned before the host saw it end
    (the engine's loop runs one step ahead) leaves it alone."""
    n = out.shape[1]
    emitted = counts - before.counts
    pos = before.prompt_len[:, None] + before.counts[:, None] + jnp.arange(n)
    pos = jnp.where(jnp.arange(n) < emitted[:, None], pos, state.tokens.shape[1])  # dropped
    rows = jnp.broadcast_to(slots[:, None], pos.shape)
    return state.replace(tokens=state.tokens.at[rows, pos].set(out, mode="drop"),
                         last=state.last.at[slots].set(last, mode="drop"),
                         counts=state.counts.at[slots].set(counts, mode="drop"),
                         max_tokens=state.max_tokens.at[slots].set(
                             jnp.where(stopped, counts, before.max_tokens), mode="drop"))


def _history(rows: SlotState) -> History:
    """What the penalties count for rows before a step: their prompt and produced tokens."""
    b = rows.counts.shape[0]
    return History(rows.tokens, rows.prompt_len, rows.counts, jnp.zeros((b, 1), jnp.int32),
                   jnp.zeros((b,), jnp.int32))


def _packed(out: jax.Array, emitted: jax.Array, done: jax.Array, stopped: jax.Array,
            logprobs: Logprobs) -> jax.Array:
    """[R, n + 3 + n(1 + 2K)] int32: the tokens, EMITTED, DONE, STOPPED, then the logprobs as
    float32 bits (one transfer to the host)."""
    r = out.shape[0]
    bits = lambda x: jax.lax.bitcast_convert_type(x.reshape(r, -1), jnp.int32)
    flags = jnp.stack([emitted, done.astype(jnp.int32), stopped.astype(jnp.int32)], axis=1)
    return jnp.concatenate([out, flags, bits(logprobs.token), logprobs.top_ids.reshape(r, -1),
                            bits(logprobs.top)], axis=1)


def _publish_rows(cache: KVCache, state: SlotState, slots: jax.Array, namespace: jax.Array):
    """The prefix index with the full blocks rows `slots` have written registered."""
    rows = cache.rows(slots)
    return publish(cache.index, rows.block_table, state.rows(slots).tokens, rows.lengths, namespace)


@functools.partial(jax.jit, donate_argnames=("cache", "state"))
def admit_program(cache: KVCache, state: SlotState, new: Admission, namespace: jax.Array
                  ) -> tuple[KVCache, SlotState, jax.Array]:
    """Admits the rows of `new`: their cached prefixes and fresh blocks (prefix_cache.admit), block
    tables and lengths (= the cached prefix) into their slots, their state. Returns the cache, the
    state and each row's cached prompt tokens (-1 when the pool could not hold them)."""
    a = jax.tree.map(jnp.asarray, new)
    empty = jnp.zeros((a.slots.shape[0], cache.block_table.shape[1]), jnp.int32)
    index, table, hit, ok = admit(cache.index, empty, a.prompts, a.prompt_len, a.blocks, namespace)
    cache = dataclasses.replace(cache, index=index,
                                block_table=cache.block_table.at[a.slots].set(table, mode="drop"),
                                lengths=cache.lengths.at[a.slots].set(hit, mode="drop"))
    return cache, insert(state, new), jnp.where(ok, hit, -1)


@functools.partial(jax.jit, donate_argnames=("cache", "state"), static_argnames=("chunk_rows", "width"))
def mixed_program(params: Params, cache: KVCache, state: SlotState, rows: jax.Array,
                  namespace: jax.Array, *, chunk_rows: int, width: int
                  ) -> tuple[jax.Array, KVCache, SlotState]:
    """A prefill chunk of `width` tokens for `chunk_rows` slots and one decode token for the rest,
    in one forward pass (chunked prefill as in vLLM / Sarathi-Serve: the running requests' tokens
    ride in the chunk's matmuls).

    rows [2P + R] int32: the chunk's slots [P], the prompt tokens each runs [P], the decode slots
    [R] (ids past the last slot are padding). Returns the packed results [P + R, 4] (a chunk row's
    token is its first, meaningful where its prompt is now done), the cache, the state.
    """
    p = chunk_rows
    chunk_slots, num_new, decode_slots = rows[:p], rows[p:2 * p], rows[2 * p:]
    c, d = state.rows(chunk_slots), state.rows(decode_slots)
    start = cache.rows(chunk_slots).lengths
    at = jnp.minimum(start[:, None] + jnp.arange(width), state.tokens.shape[1] - 1)
    chunk = jnp.where(jnp.arange(width) < num_new[:, None], jnp.take_along_axis(c.tokens, at, axis=1), 0)
    done = finished(cache.rows(decode_slots), d.counts, d.max_tokens)
    decoding = (~done).astype(jnp.int32)
    logits, cache = forward_packed(params, cache, [(chunk_slots, chunk, num_new),
                                                   (decode_slots, d.last[:, None], decoding)])
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), c, d)
    drawn_from = apply_rules(logits, both.rules, _history(both), both.stop_ids)
    tok = sample(drawn_from, token_keys(both.keys, both.counts), both.sampling)
    c_len, d_len = cache.rows(chunk_slots).lengths, cache.rows(decode_slots).lengths
    complete = (num_new > 0) & (c_len >= c.prompt_len)
    no_stop = jnp.zeros_like(complete)
    first = advance(~complete, tok[:p], c.last, c.counts, no_stop, c.stop_ids, c.max_tokens, c_len,
                    cache.max_length)
    nxt = advance(done, tok[p:], d.last, d.counts, jnp.zeros_like(done), d.stop_ids, d.max_tokens,
                  d_len, cache.max_length)
    state = _record(state, chunk_slots, c, first.counts, first.token, first.out, first.stopped)
    state = _record(state, decode_slots, d, nxt.counts, nxt.token, nxt.out, nxt.stopped)
    cache = dataclasses.replace(cache, index=_publish_rows(cache, state, chunk_slots, namespace))
    out = jnp.concatenate([first.out, nxt.out])
    emitted = jnp.concatenate([first.counts - c.counts, nxt.counts - d.counts])
    return (_packed(out, emitted, jnp.concatenate([first.done, nxt.done]),
                    jnp.concatenate([first.stopped, nxt.stopped]),
                    logprobs_of(logits, tok, both.rules.logprobs)), cache, state)


@functools.partial(jax.jit, donate_argnames=("cache", "state"), static_argnames=("out_len",))
def decode_program(params: Params, cache: KVCache, state: SlotState, rows: jax.Array, *,
                   out_len: int) -> tuple[jax.Array, KVCache, SlotState]:
    """Up to `steps` decode tokens for slots `rows[:-1]` (steps = rows[-1] <= out_len): one
    lax.while_loop ending when every row is done, or, for out_len 1, one step with no loop.
    Returns the packed results [R, out_len + 3], the cache, the state."""
    slots, steps = rows[:-1], rows[-1]
    s = state.rows(slots)
    rules = RowRules(s.rules, _history(s))
    # A constrained row takes one token per call (its next mask comes from the host).
    budget = jnp.where(s.rules.constrained, jnp.minimum(s.max_tokens, s.counts + 1), s.max_tokens)
    if out_len == 1:
        end: DecodeState = decode_step(params, slots, budget, s.sampling, s.keys, s.stop_ids, rules,
                                       decode_start(cache, slots, s.last, s.counts, budget, 1, True))
    else:
        end = decode_loop(params, cache, slots, s.last, s.counts, budget, s.sampling, s.keys,
                          s.stop_ids, steps, out_len, rules)
    state = _record(state, slots, s, end.counts, end.token, end.out, end.stopped)
    done = end.stopped | finished(end.cache.rows(slots), end.counts, s.max_tokens)  # by the real budget
    return (_packed(end.out, end.counts - s.counts, done, end.stopped, end.logprobs), end.cache, state)


@functools.partial(jax.jit, donate_argnames=("cache",))
def free_program(cache: KVCache, state: SlotState, slots: jax.Array, blocks: jax.Array,
                 namespace: jax.Array) -> KVCache:
    """Publishes the full blocks rows `slots` wrote and drops their references to the first
    `blocks` [R] blocks of their tables (unregistered ones become free)."""
    rows = cache.rows(slots)
    index = register(cache.index, rows.block_table, state.rows(slots).tokens, rows.lengths, blocks, namespace)
    return dataclasses.replace(cache, index=index)


JITTED = (admit_program, mixed_program, decode_program, free_program, set_masks)


@dataclasses.dataclass
class StepResult:
    """A step's results on the host: per row, its tokens, flags and logprobs (see `_packed`)."""

    rows: np.ndarray  # [rows, n + 3 + n(1 + 2K)] int32

    @classmethod
    def fetch(cls, out: jax.Array) -> "StepResult":
        """A launched step's results (waits for the step)."""
        return cls(to_host(out))

    @property
    def _n(self) -> int:
        return (self.rows.shape[1] - FLAGS) // (2 + 2 * MAX_LOGPROBS)

    def _flag(self, i: int, which: int) -> int:
        return int(self.rows[i, self._n + which])

    def tokens(self, i: int) -> list[int]:
        return self.rows[i, :self._flag(i, EMITTED)].tolist()

    def done(self, i: int) -> bool:
        return bool(self._flag(i, DONE))

    def stopped(self, i: int) -> bool:
        return bool(self._flag(i, STOPPED))

    def logprobs(self, i: int, alternatives: int) -> list[TokenLogprob]:
        """Row `i`'s new tokens' log-probabilities, each with its `alternatives` most likely tokens
        (and, after them, the stop id's where the row stopped at one)."""
        n, k = self._n, MAX_LOGPROBS
        row = self.rows[i, n + FLAGS:]
        token = row[:n].view(np.float32)
        ids = row[n:n + n * k].reshape(n, k)
        top = row[n + n * k:].view(np.float32).reshape(n, k)
        return [TokenLogprob(float(token[j]), tuple(zip(ids[j, :alternatives].tolist(),
                                                        top[j, :alternatives].tolist())))
                for j in range(self._flag(i, EMITTED) + self.stopped(i))]

    def stop_id(self, i: int) -> int:
        """The stop id row `i` drew (where it stopped at one; it is not among its tokens)."""
        return int(self.rows[i, self._flag(i, EMITTED)])


class Runner:
    """Executes plans on one model's cache and slot state; see the module docstring."""

    def __init__(self, params: Params, max_slots: int, max_length: int, decode_steps: int,
                 **cache_geometry):
        self.params, self.max_slots, self.decode_steps = params, max_slots, decode_steps
        self._geometry = dict(batch_size=max_slots, max_length=max_length, **cache_geometry)
        self.cache: KVCache = init_cache(params, **self._geometry)
        self.max_length = self.cache.max_length
        self.vocab_size = params.config.vocab_size
        self.state = empty_slots(max_slots, self.max_length, self.vocab_size)
        self.namespace = namespace_of(params.weights)
        self._rows: dict[tuple[int, ...], jax.Array] = {}  # device copies of recent row arrays

    # -- the plan's parts --------------------------------------------------------------------------

    def admit(self, seqs: Sequence[Request]) -> list[int]:
        """Admits requests the scheduler gave slots: returns each one's cached prompt tokens."""
        hits = []
        for seq in seqs:
            new = Admission.padded(1, self.max_length, seq.slot, self.vocab_size)
            new.fill(0, seq.slot, seq.prompt, seq.blocks, seq.options,
                     None if seq.constraint is None else seq.constraint.allowed())
            self.cache, self.state, hit = admit_program(self.cache, self.state, new, self.namespace)
            hits.append(hit)
        hits = [int(h[0]) for h in jax.device_get(hits)]
        if min(hits, default=0) < 0:
            raise RuntimeError("the KV pool could not hold a request the scheduler admitted "
                               "(its block count is out of step with the prefix index)")
        return hits

    def launch(self, plan: StepPlan) -> jax.Array:
        """Starts a plan's chunk (with a decode token per decode row) or its decode steps on the
        device and returns its packed results, not yet fetched (StepResult.fetch): rows are the
        chunk's rows, then the decode rows (padding rows follow each)."""
        if plan.prefill:
            p = self.decode_row(plan)
            ids = np.full((2 * p + self.max_slots,), self.max_slots, np.int32)
            ids[:len(plan.prefill)] = [s.slot for s, _ in plan.prefill]
            ids[p:2 * p] = 0
            ids[p:p + len(plan.prefill)] = [n for _, n in plan.prefill]
            ids[2 * p:2 * p + len(plan.decode)] = [s.slot for s in plan.decode]
            out, self.cache, self.state = mixed_program(
                self.params, self.cache, self.state, self._device(ids), self.namespace,
                chunk_rows=p, width=plan.width)
            return out
        return self._decode_rows(row_bucket(len(plan.decode), self.max_slots),
                                 [s.slot for s in plan.decode], plan.decode_steps)

    def decode_row(self, plan: StepPlan) -> int:
        """The result row of a plan's first decode row (after the chunk's rows and their padding)."""
        return row_bucket(len(plan.prefill), self.max_slots) if plan.prefill else 0

    def _decode_rows(self, rows: int, slots: list[int], steps: int) -> jax.Array:
        ids = np.full((rows + 1,), self.max_slots, np.int32)
        ids[:len(slots)], ids[-1] = slots, steps
        out, self.cache, self.state = decode_program(self.params, self.cache, self.state,
                                                     self._device(ids), out_len=self.decode_steps)
        return out

    def set_masks(self, masks: dict[int, np.ndarray], rows: int | None = None) -> None:
        """Writes constrained slots' next grammar masks ({slot: [W] int32}) into the slot state
        (`rows`: the padded row count, for warm-up; default its bucket)."""
        rows = rows or row_bucket(len(masks), self.max_slots)
        slots = np.full((rows,), self.max_slots, np.int32)
        allowed = np.zeros((rows, self.state.rules.allowed.shape[1]), np.int32)
        slots[:len(masks)] = list(masks)
        if masks:
            allowed[:len(masks)] = np.stack(list(masks.values()))
        self.state = set_masks(self.state, jnp.asarray(slots), jnp.asarray(allowed))

    def free(self, seq: Request) -> None:
        """Publishes what an ending request wrote and releases its blocks."""
        ids = self._device(np.asarray([seq.slot, seq.blocks], np.int32))
        self.cache = free_program(self.cache, self.state, ids[:1], ids[1:], self.namespace)

    def _device(self, ids: np.ndarray) -> jax.Array:
        """`ids` on the device; a step's rows repeat from step to step, so recent ones are kept
        and sent once."""
        key = tuple(ids.tolist())
        if key not in self._rows:
            if len(self._rows) >= 256:
                self._rows.clear()
            self._rows[key] = jnp.asarray(ids)
        return self._rows[key]

    # -- failures and warm-up ----------------------------------------------------------------------

    @property
    def lost(self) -> bool:
        """Whether a failed step took the donated cache or state with it."""
        return any(x.is_deleted() for x in jax.tree.leaves((self.cache, self.state)))

    def reset(self) -> None:
        """A fresh cache and slot state (after a failure lost them)."""
        self.cache = init_cache(self.params, **self._geometry)
        self.state = empty_slots(self.max_slots, self.max_length, self.vocab_size)

    def warm_mixed(self, chunk_rows: int, width: int) -> None:
        """Compiles the mixed program of one chunk shape, run on padding only (nothing changes)."""
        ids = np.full((2 * chunk_rows + self.max_slots,), self.max_slots, np.int32)
        ids[chunk_rows:2 * chunk_rows] = 0
        _, self.cache, self.state = mixed_program(self.params, self.cache, self.state, jnp.asarray(ids),
                                                  self.namespace, chunk_rows=chunk_rows, width=width)

    def warm_decode(self, rows: int) -> None:
        """Compiles the decode program for `rows` rows, run on padding only."""
        self._decode_rows(rows, [], 1)

    def warm_admission(self) -> None:
        """Compiles admission and free, run on padding only (the index's clock ticks once)."""
        pad = Admission.padded(1, self.max_length, self.max_slots, self.vocab_size)
        self.cache, self.state, _ = admit_program(self.cache, self.state, pad, self.namespace)
        none = jnp.asarray([self.max_slots, 0], np.int32)
        self.cache = free_program(self.cache, self.state, none[:1], none[1:], self.namespace)
        for rows in row_buckets(self.max_slots):
            self.set_masks({}, rows)


