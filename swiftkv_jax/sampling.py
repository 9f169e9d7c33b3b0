"""Next-token sampling: greedy, temperature, top-k and top-p, all parameters traced arrays.

Changing a sampling value never recompiles; greedy (temperature 0) skips the sort via lax.cond.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """Scaled logits with every token outside the top-k / top-p set at -inf.

    top_k = 0 and top_p = 1 disable their filter. Ties at a cut-off are kept.
    """
    x = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    vocab = x.shape[-1]
    desc = -jnp.sort(-x, axis=-1)
    rank = jnp.arange(vocab)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    desc = jnp.where(rank < k, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    # top_p >= 1 keeps all: f32 cumulative sums can reach 1 before the tail of the vocabulary.
    keep = ((jnp.cumsum(probs, axis=-1) - probs) < top_p) | (top_p >= 1)
    cutoff = jnp.min(jnp.where(keep & (rank < k), desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x >= cutoff, x, -jnp.inf)


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """One token id per row of `logits` [B, V]; temperature <= 0 means greedy."""
    return jax.lax.cond(
        temperature <= 0,
        lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
        lambda: jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p)
                                       ).astype(jnp.int32),
    )
