"""The distillation's KL term with the LM head fused in, chunk by chunk over positions.

tau^2 KL(softmax(x_t H^T / tau) || softmax(x_s H^T / tau)) summed over positions with weights:
written plainly it materialises teacher and student logits [N, V] (N = batch x sequence, V = 49k)
and half a dozen elementwise passes over them in each direction, a third of a SmolLM2 step on a
2-core CPU for a quarter of its FLOPs (benchmarks/bench_distill_step.py). Here the two head
matmuls, both softmaxes and the KL run per chunk of positions inside one scan (a chunk with no
supervised position is skipped: prompts under --assistant-only), and the backward pass needs no
recomputation: the forward pass keeps only the gradient with respect to the
student's logits, tau w (softmax(s) - softmax(t)), from which d x_s = that @ H is one matmul.
Only the student's side has a gradient (teacher, weights and head are frozen).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CHUNK = 64  # positions per chunk: [64, 49152] float32 logits are 12.6 MB


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[N, ...] -> [N / chunk, chunk, ...], zero padded."""
    pad = -x.shape[0] % chunk
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(-1, chunk, *x.shape[1:])


def _forward(x_t: jax.Array, x_s: jax.Array, w: jax.Array, head: jax.Array, tau: float, chunk: int
             ) -> tuple[jax.Array, jax.Array]:
    """(the weighted KL sum, d sum / d student logits [N, V] before the head's transpose)."""
    n = x_t.shape[0]

    def one(args: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        xt, xs, wc = args
        skip = (jnp.zeros((), jnp.float32), jnp.zeros((chunk, head.shape[0]), jnp.float32))
        return jax.lax.cond(jnp.any(wc != 0), supervised, lambda *_: skip, xt, xs, wc)

    def supervised(xt: jax.Array, xs: jax.Array, wc: jax.Array) -> tuple[jax.Array, jax.Array]:
        lt = jnp.einsum("cd,vd->cv", xt, head, preferred_element_type=jnp.float32) / tau
        ls = jnp.einsum("cd,vd->cv", xs, head, preferred_element_type=jnp.float32) / tau
        logpt, logps = jax.nn.log_softmax(lt, axis=-1), jax.nn.log_softmax(ls, axis=-1)
        pt = jnp.exp(logpt)
        kl = jnp.sum(pt * (logpt - logps), axis=-1)
        grad = (tau * wc)[:, None] * (jnp.exp(logps) - pt)  # d(tau^2 w KL) / d(x_s H^T)
        return tau**2 * jnp.sum(kl * wc), grad

    sums, grads = jax.lax.map(one, (_chunks(x_t, chunk), _chunks(x_s, chunk), _chunks(w, chunk)))
    return jnp.sum(sums), grads.reshape(-1, grads.shape[-1])[:n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def head_kl(x_t: jax.Array, x_s: jax.Array, w: jax.Array, head: jax.Array, tau: float,
            chunk: int = CHUNK) -> jax.Array:
    """sum_n w_n tau^2 KL(softmax(x_t[n] H^T / tau) || softmax(x_s[n] H^T / tau)), where x_t,
    x_s [N, D] are the final-normed hidden states, w [N] and H = `head` [V, D] (the LM head as
    the embedding stores it)."""
    return _forward(x_t, x_s, w, head, tau, chunk)[0]


def _fwd(x_t, x_s, w, head, tau, chunk):
    total, grad = _forward(x_t, x_s, w, head, tau, chunk)
    return total, (grad, head, x_t, w)


def _bwd(tau, chunk, res, ct):
    grad, head, x_t, w = res  # x_t: the student's shape and dtype too
    d_xs = ct * jnp.einsum("nv,vd->nd", grad, head.astype(jnp.float32), preferred_element_type=jnp.float32)
    return jnp.zeros_like(x_t), d_xs.astype(x_t.dtype), jnp.zeros_like(w), jnp.zeros_like(head)


head_kl.defvjp(_fwd, _bwd)
