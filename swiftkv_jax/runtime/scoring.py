"""Prompt log-probabilities (OpenAI's `echo` with `logprobs`, vLLM's prompt_logprobs): what
lm-evaluation-harness scores a multiple-choice answer by.

Every prompt position's logits need the whole model at every position, which the engine's prefill
does not compute (only a row's last token reaches the LM head, and with SwiftKV only it passes the
upper layers). So a prompt is scored by its own forward pass over the full sequence with no cache
(the distillation's evaluation pass): a SwiftKV model's logits there equal what its decode would
give at each position. It is recomputed for every request, a prefix-cache hit included, so the
figures never depend on what was cached. Prompt lengths are padded to powers of two (few compiles).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..model.forward import forward
from ..model.params import Params
from .logits import MAX_LOGPROBS, Logprobs
from .request import TokenLogprob
from .shapes import length_bucket


@functools.partial(jax.jit, static_argnames=("alternatives",))
def prompt_logprobs_program(params: Params, tokens: jax.Array, length: jax.Array, *,
                            alternatives: bool) -> Logprobs:
    """Logprobs [1, T - 1] of tokens[0, 1:] [1, T] (the first `length` real), each under the
    model's distribution after the tokens before it; the top MAX_LOGPROBS too if `alternatives`."""
    logits, _ = forward(params, None, tokens, length, all_logits=True)
    logp = jax.nn.log_softmax(logits[0, :-1], axis=-1)  # [T - 1, V]
    token = jnp.take_along_axis(logp, tokens[0, 1:, None], axis=1)[:, 0]
    k = min(MAX_LOGPROBS, logp.shape[-1])
    n = logp.shape[0]
    if alternatives:
        top, ids = jax.lax.top_k(logp, k)
        pad = ((0, 0), (0, MAX_LOGPROBS - k))
        top, ids = jnp.pad(top, pad, constant_values=-jnp.inf), jnp.pad(ids, pad)
    else:
        top, ids = jnp.zeros((n, MAX_LOGPROBS), jnp.float32), jnp.zeros((n, MAX_LOGPROBS), jnp.int32)
    return Logprobs(token[None], ids[None], top[None])


def prompt_logprobs(params: Params, prompt: np.ndarray | list[int], alternatives: int
                    ) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability (None for the first, which has no context) with its
    position's `alternatives` most likely tokens."""
    n = len(prompt)
    tokens = np.zeros((1, length_bucket(n)), np.int32)
    tokens[0, :n] = prompt
    out = jax.device_get(prompt_logprobs_program(params, jnp.asarray(tokens), jnp.asarray([n], jnp.int32),
                                                 alternatives=alternatives > 0))
    token, ids, top = out.token[0], out.top_ids[0, :, :alternatives], out.top[0, :, :alternatives]
    return [None] + [TokenLogprob(float(token[j]), tuple(zip(ids[j].tolist(), top[j].tolist())))
                     for j in range(n - 1)]
