"""Next-token sampling: greedy, temperature, top-k and top-p, all parameters traced arrays.

Changing a sampling value never recompiles. Each step takes every row's best 256 logits with
lax.top_k (XLA's partial sort); greedy is the first of them, and top-k / top-p sample among them
whenever the kept set lies inside them (almost always: a chat model's nucleus is rarely wider).
Only otherwise is the vocabulary sorted: a full sort of 16 x 49k logits took longer than the
model's whole decode step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

CANDIDATES = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Sampling settings as traced scalar arrays: new values never recompile. temperature 0 =
    greedy; top_k 0 and top_p 1 switch those filters off. (One value for the whole batch: sample()
    branches on them with lax.cond; per-row values are the engine's to add.)"""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @classmethod
    def make(cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> "SamplingParams":
        """Scalar settings as the arrays the jitted steps take."""
        return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


def _cutoff(desc: jax.Array, log_norm: jax.Array, k: jax.Array, top_p: jax.Array) -> jax.Array:
    """The smallest kept value [B, 1], from a row's best scaled logits `desc` [B, m] in descending
    order and the log of the softmax normaliser over its top-k set."""
    in_k = jnp.arange(desc.shape[-1]) < k
    probs = jnp.where(in_k, jnp.exp(desc - log_norm), 0.0)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    # top_p >= 1 keeps all: f32 cumulative sums can reach 1 before the tail of the vocabulary.
    keep = in_k & (((jnp.cumsum(probs, axis=-1) - probs) < top_p) | (top_p >= 1))
    return jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)


def _effective_k(top_k: jax.Array, vocab: int) -> jax.Array:
    return jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """Scaled logits with every token outside the top-k / top-p set at -inf (sorts the vocabulary).

    top_k = 0 and top_p = 1 disable their filter. Ties at a cut-off are kept.
    """
    x = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    vocab = x.shape[-1]
    k = _effective_k(top_k, vocab)
    desc = -jnp.sort(-x, axis=-1)
    log_norm = jax.nn.logsumexp(jnp.where(jnp.arange(vocab) < k, desc, -jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x >= _cutoff(desc, log_norm, k, top_p), x, -jnp.inf)


def sample(logits: jax.Array, key: jax.Array, settings: SamplingParams,
           candidates: int = CANDIDATES) -> jax.Array:
    """One token id per row of `logits` [B, V]; temperature <= 0 means greedy.

    Draws exactly from the top-k / top-p filtered distribution of `filter_logits`, among each row's
    best `candidates` tokens when the kept set lies within them.
    """
    temperature, top_k, top_p = settings.temperature, settings.top_k, settings.top_p
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    m = min(candidates, vocab)
    # At the top level: inside a lax.cond branch XLA:CPU lowers top_k to a full sort.
    best, best_ids = jax.lax.top_k(logits, m)

    def sampled() -> jax.Array:
        t = jnp.maximum(temperature, 1e-6)
        x_best = best / t
        k = _effective_k(top_k, vocab)
        no_filter = (top_p >= 1) & (k >= vocab)
        # The softmax normaliser of the top-k set: the candidates' own unless there is no top-k
        # (only then is a pass over the whole vocabulary needed).
        log_norm = jax.lax.cond(
            k >= vocab, lambda: jax.nn.logsumexp(logits / t, axis=-1, keepdims=True),
            lambda: jax.nn.logsumexp(jnp.where(jnp.arange(m) < k, x_best, -jnp.inf), axis=-1,
                                     keepdims=True))
        cutoff = _cutoff(x_best, log_norm, k, top_p)
        # The candidates decide the set: it is the top-k (k <= m), or, without top-k, the nucleus
        # ends before the last candidate.
        decided = ~no_filter & ((k <= m) | ((k >= vocab) & (cutoff[:, 0] > x_best[:, -1])))

        def among_candidates() -> jax.Array:
            choice = jax.random.categorical(key, jnp.where(x_best >= cutoff, x_best, -jnp.inf))
            return jnp.take_along_axis(best_ids, choice[:, None], axis=1)[:, 0]

        def whole_vocabulary() -> jax.Array:
            x = jax.lax.cond(no_filter, lambda: logits / t,
                             lambda: filter_logits(logits, temperature, top_k, top_p))
            return jax.random.categorical(key, x).astype(jnp.int32)

        return jax.lax.cond(jnp.all(decided), among_candidates, whole_vocabulary)

    return jax.lax.cond(temperature <= 0, lambda: best_ids[:, 0], sampled).astype(jnp.int32)
