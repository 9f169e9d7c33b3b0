"""Next-token sampling: greedy, temperature, top-k and top-p, all parameters traced arrays.

Changing a sampling value never recompiles. A step in which every row is greedy is one argmax.
Otherwise each row's best 256 logits are taken with lax.top_k, and top-k / top-p sample among
them whenever the kept set lies inside them (almost always: a chat model's nucleus is rarely
wider); only otherwise is the whole vocabulary used. XLA:CPU lowers that top_k to a sort of the
vocabulary (68 ms for 8 x 49k logits on a 2-core Xeon), so greedy batches never compute it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

CANDIDATES = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Sampling settings as traced arrays: new values never recompile. Scalars apply to every row,
    [B] arrays give each row its own (the engine's slots). temperature 0 = greedy; top_k 0 and
    top_p 1 switch those filters off."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @classmethod
    def make(cls, temperature=0.0, top_k=0, top_p=1.0) -> "SamplingParams":
        """Settings (scalars, or one value per row) as the arrays the jitted steps take."""
        return cls(jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
                   jnp.asarray(top_p, jnp.float32))

    def per_row(self, batch: int) -> "SamplingParams":
        """Every setting as a [batch, 1] column, so it broadcasts against [batch, V] logits."""
        col = lambda x: jnp.broadcast_to(jnp.reshape(x, (-1, 1)), (batch, 1))
        return SamplingParams(col(self.temperature), col(self.top_k), col(self.top_p))


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


def _row_keys(key: jax.Array, batch: int) -> jax.Array:
    """One key per row: given as such ([B] typed or [B, 2] raw keys), or folded from one key."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if key.ndim == (1 if typed else 2):
        return key
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(batch))


def _gumbel(keys: jax.Array, ids: jax.Array) -> jax.Array:
    """Gumbel noise [B, n] for token ids [B, n], a function of (row key, token id) alone: a token
    gets the same noise whether it is drawn among the candidates or the whole vocabulary, so a
    row's draw never depends on which path its batch took or on the other rows."""
    per_token = lambda k, i: jax.random.gumbel(jax.random.fold_in(k, i), ())
    return jax.vmap(lambda k, row: jax.vmap(lambda i: per_token(k, i))(row))(keys, ids)


def sample(logits: jax.Array, key: jax.Array, settings: SamplingParams,
           candidates: int = CANDIDATES) -> jax.Array:
    """One token id per row of `logits` [B, V]; a row with temperature <= 0 is greedy.

    `settings` hold one value for all rows or one per row; `key` is one key or one per row (a
    row's draw then depends only on its key and logits, never on its neighbours). Draws
    exactly from the top-k / top-p filtered distribution of `filter_logits`, among each row's best
    `candidates` tokens when every row's kept set lies within them.
    """
    logits = logits.astype(jnp.float32)
    batch, vocab = logits.shape
    s = settings.per_row(batch)  # [B, 1] columns
    m = min(candidates, vocab)
    # Greedy is an argmax (the first index on ties, as top_k's first); the candidates' top_k
    # (a sort on XLA:CPU, see the module docstring) only runs when some row samples.
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    is_greedy = s.temperature <= 0

    def sampled() -> jax.Array:
        best, best_ids = jax.lax.top_k(logits, m)
        t = jnp.maximum(s.temperature, 1e-6)
        x_best = best / t
        k = _effective_k(s.top_k, vocab)
        no_filter = (s.top_p >= 1) & (k >= vocab)
        # The softmax normaliser of the top-k set: the candidates' own unless a row has no top-k
        # (only then is a pass over the whole vocabulary needed).
        top_norm = jax.nn.logsumexp(jnp.where(jnp.arange(m) < k, x_best, -jnp.inf), axis=-1,
                                    keepdims=True)
        log_norm = jax.lax.cond(
            jnp.any(k >= vocab),
            lambda: jnp.where(k >= vocab, jax.nn.logsumexp(logits / t, axis=-1, keepdims=True),
                              top_norm),
            lambda: top_norm)
        cutoff = _cutoff(x_best, log_norm, k, s.top_p)
        # The candidates decide the set: it is the top-k (k <= m), or, without top-k, the nucleus
        # ends before the last candidate. Greedy rows need no set.
        decided = is_greedy | (~no_filter & ((k <= m) | ((k >= vocab) & (cutoff > x_best[:, -1:]))))

        # Gumbel-max: argmax(x + noise) is an exact draw from softmax(x).
        keys = _row_keys(key, batch)

        def among_candidates() -> jax.Array:
            kept = jnp.where(x_best >= cutoff, x_best + _gumbel(keys, best_ids), -jnp.inf)
            return jnp.take_along_axis(best_ids, jnp.argmax(kept, axis=1)[:, None], axis=1)[:, 0]

        def whole_vocabulary() -> jax.Array:
            x = jax.lax.cond(jnp.all(no_filter), lambda: logits / t, lambda: jnp.where(
                no_filter, logits / t, filter_logits(logits, s.temperature, s.top_k, s.top_p)))
            ids = jnp.broadcast_to(jnp.arange(vocab), (batch, vocab))
            return jnp.argmax(x + _gumbel(keys, ids), axis=1).astype(jnp.int32)

        drawn = jax.lax.cond(jnp.all(decided), among_candidates, whole_vocabulary)
        return jnp.where(is_greedy[:, 0], greedy, drawn)

    return jax.lax.cond(jnp.all(is_greedy), lambda: greedy, sampled).astype(jnp.int32)
