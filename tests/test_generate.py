"""generate(): sampling rules, seeds, compilation behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import swiftkv_jax as sk
from swiftkv_jax.runtime.generation import decode, prefill, prefill_bucket
from swiftkv_jax.runtime.sampling import SamplingParams, filter_logits, sample

CFG = sk.ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, eos_token_ids=(2,))


@pytest.fixture(scope="module")
def params():
    p = sk.init_params(CFG, jax.random.PRNGKey(0))
    # Scale the head so the distribution is peaked enough for sampling to be interesting.
    return sk.Params(dict(p.weights, lm_head=p.weights["lm_head"] * 20), CFG)


def test_same_seed_same_output_different_seed_differs(params):
    kw = dict(max_new_tokens=24, temperature=1.0, top_k=40, top_p=0.95, stop_ids=[])
    a, _ = sk.generate(params, None, [5, 6, 7], seed=1, **kw)
    b, _ = sk.generate(params, None, [5, 6, 7], seed=1, **kw)
    c, _ = sk.generate(params, None, [5, 6, 7], seed=2, **kw)
    assert a == b and a != c


def test_top_k_1_equals_greedy(params):
    greedy, _ = sk.generate(params, None, [5, 6, 7], max_new_tokens=24, stop_ids=[])
    top1, _ = sk.generate(params, None, [5, 6, 7], max_new_tokens=24, temperature=1.3, top_k=1,
                          seed=3, stop_ids=[])
    assert top1 == greedy


def _allowed(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> set[int]:
    """The allowed set computed independently with numpy: top-k, then the top-p nucleus."""
    order = np.argsort(-logits)
    keep = order[:top_k] if top_k else order
    p = np.exp((logits[keep] - logits[keep].max()) / temperature)
    p /= p.sum()
    n = int(np.searchsorted(np.cumsum(p), top_p) + 1)  # smallest prefix with mass >= top_p
    if top_p >= 1:  # off
        n = len(keep)
    return set(keep[:min(n, len(keep))].tolist())


# Vocabulary 2000, rows 0, 1, 3 peaked and row 2 nearly flat: the cut-off is found among the best
# 256 candidates (top_k <= 256, narrow nuclei), or needs the sorted row (top_k in (256, 2000), the
# flat row's nucleus), or there is no filter at all.
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.6), (1.5, 10, 0.5),
                                                     (1.0, 0, 1.0), (1.0, 256, 1.0), (1.0, 500, 1.0),
                                                     (1.0, 500, 0.9), (2.0, 0, 0.95), (1.0, 40, 0.99)])
def test_filter_allows_exactly_the_top_k_top_p_set(temperature, top_k, top_p):
    scale = np.array([[3.0], [3.0], [0.05], [3.0]], np.float32)
    logits = np.random.default_rng(0).normal(size=(4, 2000)).astype(np.float32) * scale
    out = np.asarray(filter_logits(jnp.asarray(logits), jnp.float32(temperature), jnp.int32(top_k),
                                   jnp.float32(top_p)))
    for row in range(4):
        assert set(np.flatnonzero(np.isfinite(out[row])).tolist()) == \
            _allowed(logits[row], temperature, top_k, top_p)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.6), (1.0, 500, 0.9),
                                                     (2.0, 0, 0.95), (1.0, 0, 1.0)])
def test_sampling_among_the_best_candidates_is_exact(temperature, top_k, top_p):
    """sample() draws among the best 256 tokens when they hold the kept set, else from the whole
    filtered vocabulary: always inside the allowed set, and as often beyond the best 256 as the
    filtered distribution says (which drawing from the candidates alone would get wrong)."""
    scale = np.array([[3.0], [3.0], [0.05], [3.0]], np.float32)
    logits = np.random.default_rng(0).normal(size=(4, 2000)).astype(np.float32) * scale
    draw = jax.jit(jax.vmap(lambda k: sample(jnp.asarray(logits), k, SamplingParams.make(
        temperature, top_k, top_p))))
    n = 4000
    tokens = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), n)))  # [n, 4]
    for row in range(4):
        allowed = np.array(sorted(_allowed(logits[row], temperature, top_k, top_p)))
        assert set(np.unique(tokens[:, row]).tolist()) <= set(allowed.tolist())
        p = np.exp((logits[row, allowed] - logits[row, allowed].max()) / temperature)
        p /= p.sum()
        beyond = np.isin(allowed, np.argsort(-logits[row])[256:])
        expected = p[beyond].sum()
        got = np.isin(tokens[:, row], allowed[beyond]).mean()
        assert abs(got - expected) <= 4 * np.sqrt(expected * (1 - expected) / n) + 0.01, (row, got, expected)


def test_samples_stay_in_allowed_set_and_follow_the_distribution():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(1, 50)).astype(np.float32) * 2)
    allowed = _allowed(np.asarray(logits[0]), 1.0, 8, 0.8)
    draw = jax.jit(jax.vmap(lambda k: sample(logits, k, SamplingParams.make(1.0, 8, 0.8))[0]))
    tokens = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), 20000)))
    assert set(np.unique(tokens).tolist()) <= allowed
    # Frequencies follow the renormalised distribution over the allowed set.
    idx = np.array(sorted(allowed))
    p = np.exp(np.asarray(logits[0])[idx] - np.asarray(logits[0])[idx].max())
    p /= p.sum()
    freq = np.array([(tokens == i).mean() for i in idx])
    assert np.abs(freq - p).max() < 0.02


def test_new_length_in_bucket_and_new_sampling_values_do_not_recompile(params):
    cache = sk.init_cache(params, 2, 64)
    _, cache = sk.generate(params, cache, [[1] * 5, [2] * 9], max_new_tokens=4)
    before = (prefill._cache_size(), decode._cache_size())
    for lengths, kw in [((7, 12), dict(temperature=0.5)), ((16, 3), dict(top_k=5, top_p=0.9, seed=4)),
                        ((10, 11), dict(max_new_tokens=9, stop_ids=[3, 4]))]:
        kw.setdefault("max_new_tokens", 4)
        _, cache = sk.generate(params, cache, [[1] * lengths[0], [2] * lengths[1]], **kw)
    assert (prefill._cache_size(), decode._cache_size()) == before
    assert prefill_bucket(7, 64) == prefill_bucket(16, 64) == 16
    _, cache = sk.generate(params, cache, [[3] * 17, [4]], max_new_tokens=4)  # next bucket: compiles
    assert prefill._cache_size() == before[0] + 1


def test_cache_is_reused_across_calls_and_rows_are_reset(params):
    cache = sk.init_cache(params, 1, 64)
    first, cache = sk.generate(params, cache, [5, 6, 7], max_new_tokens=10, stop_ids=[])
    assert int(cache.lengths[0]) == 3 + 10 - 1  # the last sampled token is not fed back
    again, cache = sk.generate(params, cache, [5, 6, 7], max_new_tokens=10, stop_ids=[])
    assert again == first
