"""Prompt log-probabilities (OpenAI's `echo` with `logprobs`, vLLM's prompt_logprobs): what
lm-evaluation-harness scores a multiple-choice answer by.

Every prompt position's logits need the whole model at every position, which the engine's prefill
does not compute (only a row's last token reaches the LM head, and with SwiftKV only it passes the
upper layers). So a prompt is scored by its own forward pass over the full sequence with no cache
(the distillation's evaluation pass): a SwiftKV model's logits there equal what its decode would
give at each position. It is recomputed for every request, a prefix-cache hit included, so the
figures never depend on what was cached. The waiting prompts are scored together, several per
pass (lm-eval sends 8 short ones per request); rows and lengths are padded to powers of two.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..model.forward import forward
from ..model.params import Params
from .logits import MAX_LOGPROBS, Logprobs, top_logprobs
from .request import TokenLogprob
from .shapes import length_bucket, pow2_at_least

SCORE_TOKENS = 2048  # padded tokens per scoring call ([rows, T, V] f32 logits: ~400 MB at V = 49k)
SCORE_ROWS = 8  # prompts per scoring call at most


@functools.partial(jax.jit, static_argnames=("alternatives",))
def prompt_logprobs_program(params: Params, tokens: jax.Array, lengths: jax.Array, *,
                            alternatives: bool) -> Logprobs:
    """Logprobs [B, T - 1] of tokens[:, 1:] [B, T] (each row's first `lengths` real), each under
    the model's distribution after the tokens before it; the top MAX_LOGPROBS too if `alternatives`."""
    logits, _ = forward(params, None, tokens, lengths, all_logits=True)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [B, T - 1, V]
    token = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    if alternatives:
        top, ids = top_logprobs(logp)
    else:
        top = jnp.zeros(token.shape + (MAX_LOGPROBS,), jnp.float32)
        ids = jnp.zeros(token.shape + (MAX_LOGPROBS,), jnp.int32)
    return Logprobs(token, ids, top)


def batches(lengths: list[int]) -> list[list[int]]:
    """Prompt indices grouped in order into scoring calls: at most SCORE_ROWS each, and rows x the
    longest one's length bucket at most SCORE_TOKENS (a longer prompt goes alone)."""
    out: list[list[int]] = []
    for i, n in enumerate(lengths):
        group = out[-1] if out else None
        if group is not None and len(group) < SCORE_ROWS:
            width = length_bucket(max([n] + [lengths[j] for j in group]))
            if pow2_at_least(len(group) + 1) * width <= SCORE_TOKENS:
                group.append(i)
                continue
        out.append([i])
    return out


def prompt_logprobs(params: Params, prompts: Sequence[Sequence[int]], alternatives: Sequence[int]
                    ) -> list[list[TokenLogprob | None]]:
    """For each prompt, each token's log-probability (None for the first, which has no context)
    with its position's `alternatives[i]` most likely tokens; several prompts per forward pass
    (rows and lengths padded to powers of two, so few shapes compile)."""
    out: list[list[TokenLogprob | None]] = [[] for _ in prompts]
    for group in batches([len(p) for p in prompts]):
        width = length_bucket(max(len(prompts[i]) for i in group))
        tokens = np.zeros((pow2_at_least(len(group)), width), np.int32)
        lengths = np.zeros((tokens.shape[0],), np.int32)
        for row, i in enumerate(group):
            tokens[row, :len(prompts[i])], lengths[row] = prompts[i], len(prompts[i])
        got = jax.device_get(prompt_logprobs_program(params, jnp.asarray(tokens), jnp.asarray(lengths),
                                                     alternatives=max(alternatives[i] for i in group) > 0))
        for row, i in enumerate(group):
            k = alternatives[i]
            ids, top = got.top_ids[row, :, :k], got.top[row, :, :k]
            out[i] = [None] + [TokenLogprob(float(got.token[row, j]),
                                            tuple(zip(ids[j].tolist(), top[j].tolist())))
                               for j in range(len(prompts[i]) - 1)]
    return out
