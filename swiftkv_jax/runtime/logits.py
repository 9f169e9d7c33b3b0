"""What a request asks of the logits besides sampling: OpenAI's penalties, logit_bias and
min_tokens applied before the draw, a grammar's allowed tokens (structured output), and the
log-probabilities it wants back.

All of it is per-row arrays on the device (`LogitRules`), written once when a request is admitted,
so new values never recompile. The penalties need each row's token counts: they are counted from
the row's own tokens (the prompt, then what it produced), which the engine keeps on the device
anyway, and only in a step where some row has a penalty (`lax.cond`), so requests without one pay
nothing. Order, as vLLM's sampler: min_tokens, logit_bias, then the repetition, frequency and
presence penalties; then a constrained row's grammar mask (a bitmask the host rewrites before
each of the row's tokens, runtime/constraint.py), which has the last word. Log-probabilities are
of the model's own distribution (the raw logits' log_softmax, before all of these and before
temperature / top-k / top-p: vLLM's default).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from .shapes import MAX_LOGIT_BIAS, MAX_LOGPROBS, NO_TOKEN


def mask_words(vocab: int) -> int:
    """int32 words of a token bitmask over `vocab` tokens (token t is bit t % 32 of word t // 32)."""
    return (vocab + 31) // 32


@struct.dataclass
class LogitRules:
    """Per-row rules, arrays over B rows. presence / frequency: OpenAI's penalties (0 = off) on
    the tokens a row produced; repetition: vLLM's / HF's multiplicative penalty (1 = off) on
    tokens of its prompt or output; min_tokens: the row's stop ids cannot be drawn before it has
    produced that many; bias_ids / bias: logit_bias (NO_TOKEN padded); logprobs: -1 none, k >= 0
    the drawn token's log-probability and the k most likely alternatives'."""

    presence: jax.Array    # [B] float32
    frequency: jax.Array   # [B] float32
    repetition: jax.Array  # [B] float32
    min_tokens: jax.Array  # [B] int32
    bias_ids: jax.Array    # [B, MAX_LOGIT_BIAS] int32
    bias: jax.Array        # [B, MAX_LOGIT_BIAS] float32
    logprobs: jax.Array    # [B] int32
    constrained: jax.Array  # [B] bool
    allowed: jax.Array     # [B, mask_words(V)] int32 bitmask

    @classmethod
    def none(cls, batch: int, vocab: int, xp: Any = jnp) -> "LogitRules":
        """B rows asking for nothing (every rule off), as `xp` arrays (numpy for host-side rows)."""
        full = lambda shape, v, dtype: xp.full(shape, v, dtype)
        return cls(presence=full(batch, 0.0, xp.float32), frequency=full(batch, 0.0, xp.float32),
                   repetition=full(batch, 1.0, xp.float32), min_tokens=full(batch, 0, xp.int32),
                   bias_ids=full((batch, MAX_LOGIT_BIAS), NO_TOKEN, xp.int32),
                   bias=full((batch, MAX_LOGIT_BIAS), 0.0, xp.float32), logprobs=full(batch, -1, xp.int32),
                   constrained=full(batch, False, bool),
                   allowed=full((batch, mask_words(vocab)), 0, xp.int32))

    def rows(self, index: jax.Array) -> "LogitRules":
        """The rules of rows `index` [R]; an id past the last row (padding) reads as a row asking
        nothing, so padding never switches a rule's work on."""
        take = lambda name: jnp.take(getattr(self, name), index, axis=0, mode="fill",
                                     fill_value=_NOTHING.get(name, 0))
        return LogitRules(**{f.name: take(f.name) for f in dataclasses.fields(self)})


_NOTHING = {"repetition": 1.0, "bias_ids": NO_TOKEN, "logprobs": -1}  # a rule's "off" (else 0)


@struct.dataclass
class History:
    """Each row's tokens so far, for the penalties: `tokens` [B, W] hold the prompt (the first
    `prompt_len` [B]) then `produced` [B] output tokens; `recent` [B, n] holds output tokens made
    since (the first `recent_len` [B] real), for a decode loop that has not written them back."""

    tokens: jax.Array
    prompt_len: jax.Array
    produced: jax.Array
    recent: jax.Array
    recent_len: jax.Array

    def counts(self, vocab: int) -> tuple[jax.Array, jax.Array]:
        """(output token counts [B, V] int32, tokens seen in prompt or output [B, V] bool)."""
        b, w = self.tokens.shape
        pos = jnp.arange(w)
        in_prompt = pos < self.prompt_len[:, None]
        in_output = ~in_prompt & (pos < (self.prompt_len + self.produced)[:, None])
        recent = jnp.arange(self.recent.shape[1]) < self.recent_len[:, None]
        rows = jnp.arange(b)[:, None]
        zeros = jnp.zeros((b, vocab), jnp.int32)
        i32 = lambda mask: mask.astype(jnp.int32)
        out = zeros.at[rows, self.tokens].add(i32(in_output), mode="drop")
        out = out.at[rows, self.recent].add(i32(recent), mode="drop")
        seen = zeros.at[rows, self.tokens].add(i32(in_prompt), mode="drop") + out
        return out, seen > 0


def apply_rules(logits: jax.Array, rules: LogitRules, history: History, stop_ids: jax.Array
                ) -> jax.Array:
    """The logits [B, V] a row's draw uses: stop ids masked before min_tokens, logit_bias added,
    then the repetition, frequency and presence penalties (counted only when some row has one),
    then a constrained row's grammar mask."""
    batch, vocab = logits.shape
    rows = jnp.arange(batch)[:, None]
    produced = history.produced + history.recent_len
    early = ((produced < rules.min_tokens) & ~rules.constrained)[:, None]
    stops = jnp.where(early & (stop_ids >= 0), stop_ids, NO_TOKEN)

    def biased(x: jax.Array) -> jax.Array:
        x = x.at[rows, stops].set(-jnp.inf, mode="drop")
        return x.at[rows, rules.bias_ids].add(rules.bias, mode="drop")

    def penalised(x: jax.Array) -> jax.Array:
        counts, seen = history.counts(vocab)
        rep = rules.repetition[:, None]
        x = jnp.where(seen, jnp.where(x > 0, x / rep, x * rep), x)
        return x - rules.frequency[:, None] * counts - rules.presence[:, None] * (counts > 0)

    def grammar(x: jax.Array) -> jax.Array:
        token = jnp.arange(vocab)
        bit = (jnp.take(rules.allowed, token // 32, axis=1) >> (token % 32)) & 1
        return jnp.where(rules.constrained[:, None] & (bit == 0), -jnp.inf, x)

    # Each rule's work only in a step where some row has it (a plain step pays three predicates).
    any_bias = jnp.any(stops != NO_TOKEN) | jnp.any(rules.bias_ids != NO_TOKEN)
    any_penalty = jnp.any((rules.presence != 0) | (rules.frequency != 0) | (rules.repetition != 1))
    logits = jax.lax.cond(any_bias, biased, lambda x: x, logits)
    logits = jax.lax.cond(any_penalty, penalised, lambda x: x, logits)
    return jax.lax.cond(jnp.any(rules.constrained), grammar, lambda x: x, logits)


@struct.dataclass
class Logprobs:
    """Log-probabilities of drawn tokens, arrays over B rows and n tokens each: the drawn token's
    [B, n] and its row's MAX_LOGPROBS most likely tokens (ids and log-probabilities [B, n, K],
    most likely first; zeros where no row asked for them)."""

    token: jax.Array
    top_ids: jax.Array
    top: jax.Array

    @classmethod
    def empty(cls, batch: int, n: int) -> "Logprobs":
        return cls(jnp.zeros((batch, n), jnp.float32), jnp.zeros((batch, n, MAX_LOGPROBS), jnp.int32),
                   jnp.zeros((batch, n, MAX_LOGPROBS), jnp.float32))

    def at(self, step: jax.Array, new: "Logprobs") -> "Logprobs":
        """These with column `step` set to `new` (one token per row)."""
        return jax.tree.map(lambda x, v: x.at[:, step].set(v[:, 0]), self, new)


def top_logprobs(logp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The MAX_LOGPROBS largest log-probabilities over the last axis and their token ids, most
    likely first (a vocabulary under MAX_LOGPROBS pads them with -inf and id 0)."""
    k = min(MAX_LOGPROBS, logp.shape[-1])
    values, ids = jax.lax.top_k(logp, k)
    pad = [(0, 0)] * (logp.ndim - 1) + [(0, MAX_LOGPROBS - k)]
    return jnp.pad(values, pad, constant_values=-jnp.inf), jnp.pad(ids, pad)


def logprobs_of(logits: jax.Array, tokens: jax.Array, wanted: jax.Array) -> Logprobs:
    """Logprobs (n = 1) of `tokens` [B] under the raw `logits` [B, V]; computed only when some
    row wants them (`wanted` [B]: -1 none, else how many alternatives), the top-k only when some
    row wants alternatives."""
    batch = logits.shape[0]

    def compute() -> Logprobs:
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        token = jnp.take_along_axis(logp, tokens[:, None], axis=1)
        none = (jnp.zeros((batch, MAX_LOGPROBS), jnp.float32), jnp.zeros((batch, MAX_LOGPROBS), jnp.int32))
        values, ids = jax.lax.cond(jnp.any(wanted > 0), lambda: top_logprobs(logp), lambda: none)
        return Logprobs(token, ids[:, None], values[:, None])

    return jax.lax.cond(jnp.any(wanted >= 0), compute, lambda: Logprobs.empty(batch, 1))
