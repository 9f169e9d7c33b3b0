"""The jitted device steps that the engine and generate() share: one code path for the cache.

Each step works on some rows ("slots") of one KV cache: it gathers those rows' block tables and
lengths, runs the model on them over the shared pools, and scatters the lengths back. Slot ids
past the last row are padding: their tokens are not written and their results are ignored, so a
step's shapes come from a few buckets and never from the request mix. The cache is donated to
every step, so XLA updates the pools in place.

  prefill:      one chunk of prompt tokens per row, after what the row already holds
  first_tokens: the first token of each row from its last prefill logits
  decode:       up to `steps` tokens per row in one lax.while_loop (the whole decode in XLA)
The engine's own programs over its per-slot state (runner.py) are built from the same parts.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..model.forward import forward_packed
from ..model.params import Params
from .cache import KVCache
from .logits import History, LogitRules, Logprobs, apply_rules, logprobs_of
from .prefix_cache import weights_namespace
from .sampling import SamplingParams, sample

namespace_of = jax.jit(weights_namespace)


def _all_rows(cache: KVCache, slots: jax.Array | None) -> jax.Array:
    """`slots`, or every row of the cache when None."""
    return jnp.arange(cache.batch_size, dtype=jnp.int32) if slots is None else slots


@functools.partial(jax.jit, donate_argnames=("cache",))
def prefill(params: Params, cache: KVCache, tokens: jax.Array, num_new: jax.Array,
            slots: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Runs a chunk of `tokens` [P, T] (the first `num_new[p]` real) after what rows `slots` [P]
    hold (default: every row); returns the logits of each row's last real token [P, V] and the
    cache with the chunk's K/V written and those rows' lengths advanced."""
    return forward_packed(params, cache, [(_all_rows(cache, slots), tokens, num_new.astype(jnp.int32))])


def token_keys(request_keys: jax.Array, index: jax.Array) -> jax.Array:
    """The PRNG key of each row's token number `index` [B] from its request key [B, 2]: a
    request's draws depend on its seed and position only, never on its slot or neighbours."""
    return jax.vmap(jax.random.fold_in)(request_keys, index)


@jax.jit
def first_tokens(logits: jax.Array, sampling: SamplingParams, request_keys: jax.Array) -> jax.Array:
    """Token 0 of each row [P] from its last prefill logits [P, V]."""
    return sample(logits, token_keys(request_keys, jnp.zeros(logits.shape[:1], jnp.int32)), sampling)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The state of the decode while_loop (arrays over the R decoded rows).

    step:    loop iteration; column `step` of `out` is written next
    token:   [R] each row's last token, not yet in the cache (the next step's input)
    counts:  [R] tokens each row has produced so far (its first token included)
    done:    [R] rows that stopped (stop id, token budget, full cache, or padding)
    stopped: [R] rows that stopped at a stop id (which is not output)
    out:     [R, out_len] the tokens produced in this call, 0 after a row's end
    cache:   the KV cache, threaded through every step
    logprobs: the log-probabilities of `out` (with RowRules; None without)
    """

    step: jax.Array
    token: jax.Array
    counts: jax.Array
    done: jax.Array
    stopped: jax.Array
    out: jax.Array
    cache: KVCache
    logprobs: Logprobs | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowRules:
    """The engine's per-request rules for a decode (logits.py): penalties, logit_bias,
    min_tokens, logprobs, and each row's tokens before the call (`history`, which the loop
    extends with what it produces). generate() decodes without them."""

    rules: LogitRules
    history: History

    def apply(self, logits: jax.Array, s: DecodeState, stop_ids: jax.Array) -> jax.Array:
        """The logits the draw uses at loop state `s`."""
        recent = dataclasses.replace(self.history, recent=s.out, recent_len=s.counts - self.history.produced)
        return apply_rules(logits, self.rules, recent, stop_ids)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeResult:
    """What one decode call gives back to the host, per decoded row."""

    out: jax.Array      # [R, out_len] new tokens, the first `counts - counts_before` real (then the
    #                     stop id where a row stopped at one)
    counts: jax.Array   # [R] tokens produced so far, after this call
    token: jax.Array    # [R] the last token (next call's input)
    done: jax.Array     # [R] the row has ended
    stopped: jax.Array  # [R] it ended at a stop id
    lengths: jax.Array  # [R] tokens with their K/V in the row's cache


def decode_start(cache: KVCache, slots: jax.Array, token: jax.Array, counts: jax.Array,
                 max_tokens: jax.Array, out_len: int, with_logprobs: bool = False) -> DecodeState:
    """The decode loop's state before its first step (rows that cannot decode are done)."""
    return DecodeState(jnp.int32(0), token, counts, finished(cache.rows(slots), counts, max_tokens),
                       jnp.zeros(token.shape, bool), jnp.zeros(token.shape + (out_len,), jnp.int32),
                       cache, Logprobs.empty(token.shape[0], out_len) if with_logprobs else None)


def decode_step(params: Params, slots: jax.Array, max_tokens: jax.Array, sampling: SamplingParams,
                request_keys: jax.Array, stop_ids: jax.Array, rules: RowRules | None,
                s: DecodeState) -> DecodeState:
    """One decode token for every row that is not done: forward, rules, sample, stop checks."""
    logits, new = forward_packed(params, s.cache, [(slots, s.token[:, None], (~s.done).astype(jnp.int32))])
    drawn_from = logits if rules is None else rules.apply(logits, s, stop_ids)
    tok = sample(drawn_from, token_keys(request_keys, s.counts), sampling)
    r = advance(s.done, tok, s.token, s.counts, s.stopped, stop_ids, max_tokens,
                 new.rows(slots).lengths, new.max_length)
    logprobs = s.logprobs if rules is None else s.logprobs.at(
        s.step, logprobs_of(logits, tok, rules.rules.logprobs))
    return DecodeState(s.step + 1, r.token, r.counts, r.done, r.stopped,
                       s.out.at[:, s.step].set(r.out[:, 0]), new, logprobs)


def decode_loop(params: Params, cache: KVCache, slots: jax.Array, token: jax.Array,
                counts: jax.Array, max_tokens: jax.Array, sampling: SamplingParams,
                request_keys: jax.Array, stop_ids: jax.Array, steps: jax.Array, out_len: int,
                rules: RowRules | None = None) -> DecodeState:
    """Up to `steps` (<= out_len) decode steps in one lax.while_loop that ends early when every
    row is done (see `decode`); returns the loop's final state."""
    steps = jnp.minimum(steps, out_len)
    step = functools.partial(decode_step, params, slots, max_tokens, sampling, request_keys, stop_ids, rules)
    start = decode_start(cache, slots, token, counts, max_tokens, out_len, rules is not None)
    return jax.lax.while_loop(lambda s: (s.step < steps) & ~jnp.all(s.done), step, start)


@functools.partial(jax.jit, donate_argnames=("cache",), static_argnames=("out_len",))
def decode(params: Params, cache: KVCache, slots: jax.Array | None, token: jax.Array,
           counts: jax.Array, max_tokens: jax.Array, sampling: SamplingParams,
           request_keys: jax.Array, stop_ids: jax.Array, steps: jax.Array, *, out_len: int
           ) -> tuple[DecodeResult, KVCache]:
    """Up to `steps` (<= out_len) new tokens for rows `slots` [R] (None: every row), one
    lax.while_loop that ends early when every row is done.

    token [R]: each row's last token (not yet in the cache); counts [R]: tokens it has produced;
    a row stops at a token in its `stop_ids` [R, MAX_STOP_IDS] (-1 padded; not output), at
    `max_tokens` [R] produced (0 for padding rows), or when its cache row is full.
    """
    slots = _all_rows(cache, slots)
    end = decode_loop(params, cache, slots, token, counts, max_tokens, sampling, request_keys,
                      stop_ids, steps, out_len)
    result = DecodeResult(end.out, end.counts, end.token, end.done, end.stopped,
                          end.cache.rows(slots).lengths)
    return result, end.cache


def finished(rows: KVCache, counts: jax.Array, max_tokens: jax.Array) -> jax.Array:
    """[R] rows that cannot decode: their cache row is full or their token budget spent."""
    return (rows.lengths >= rows.max_length) | (counts >= max_tokens)


def advance(done: jax.Array, tok: jax.Array, last: jax.Array, counts: jax.Array,
             stopped: jax.Array, stop_ids: jax.Array, max_tokens: jax.Array, lengths: jax.Array,
             capacity: int) -> DecodeResult:
    """The rows after one decode step sampled `tok` [R]: a stop id ends a row and is not output
    (it is in `out`, past the emitted tokens, for the host's logprobs); otherwise the token is
    emitted, and the row ends at its token budget or a full cache row."""
    stop = ~done & jnp.any(tok[:, None] == stop_ids, axis=1)
    emit = ~done & ~stop
    counts = counts + emit
    done = done | stop | (counts >= max_tokens) | (lengths >= capacity)
    return DecodeResult(jnp.where(emit | stop, tok, 0)[:, None], counts, jnp.where(emit, tok, last), done,
                        stopped | stop, lengths)


def to_host(x: jax.Array) -> np.ndarray:
    """x as numpy; an array spread over several processes (multi-host mesh) is gathered first."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def seed_keys(seeds: jax.Array, rows: jax.Array) -> jax.Array:
    """[B, 2] raw PRNG keys from uint32 seeds [B] and rows [B] (fold_in(PRNGKey(seed), row))."""
    return jax.vmap(lambda s, r: jax.random.fold_in(jax.random.PRNGKey(s), r))(seeds, rows)


_request_keys = jax.jit(seed_keys)


def request_keys(seeds, rows=None) -> jax.Array:
    """[B, 2] raw PRNG keys: request b's from its seed and its row in a generate() batch (0 for an
    engine request, so one prompt sampled alone draws the same either way)."""
    seeds = np.asarray(seeds, np.int64) % (1 << 32)
    rows = np.zeros(len(seeds), np.int32) if rows is None else np.asarray(rows, np.int32)
    return _request_keys(jnp.asarray(seeds.astype(np.uint32)), jnp.asarray(rows))
