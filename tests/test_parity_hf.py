"""Our Llama against Hugging Face transformers on tiny random models: logits and greedy tokens."""

import jax.numpy as jnp
from conftest import hf_greedy, hf_logits, prompts, rel_err

import swiftkv_jax as sk


def test_full_prompt_logits_match(tiny_model):
    _, folder, hf = tiny_model
    params, _ = sk.load(folder, progress=False)
    ids = prompts(params.config.vocab_size, [40, 40], seed=1)
    ours, _ = sk.forward(params, None, jnp.asarray(ids), all_logits=True)
    assert rel_err(ours, hf_logits(hf, ids)) <= 1e-4


def test_prefill_then_decode_through_cache_matches(tiny_model):
    """Every step of prefill-then-decode through the paged cache, against HF on the whole sequence."""
    _, folder, hf = tiny_model
    params, _ = sk.load(folder, progress=False)
    ids = prompts(params.config.vocab_size, [30], seed=2)[0]
    ref = hf_logits(hf, [ids])[0]
    cache = sk.init_cache(params, 1, 64, block_size=8)  # rows span several blocks
    logits, cache = sk.forward(params, cache, jnp.asarray([ids[:20]]))
    assert rel_err(logits[0], ref[19]) <= 1e-4
    for t in range(20, 30):
        logits, cache = sk.forward(params, cache, jnp.asarray([[ids[t]]]))
        assert rel_err(logits[0], ref[t]) <= 1e-4, f"decode step at position {t}"
    assert int(cache.lengths[0]) == 30


def test_greedy_generation_matches_transformers(tiny_model):
    _, folder, hf = tiny_model
    params, _ = sk.load(folder, progress=False)
    for ids in prompts(params.config.vocab_size, [5, 17], seed=3):
        ours, _ = sk.generate(params, None, ids, max_new_tokens=40, stop_ids=[])
        assert ours == hf_greedy(hf, ids, 40)


def test_batch_of_different_lengths_equals_each_alone(gqa_model):
    folder, _ = gqa_model
    params, _ = sk.load(folder, progress=False)
    batch = prompts(params.config.vocab_size, [3, 11, 26, 7], seed=4)
    together, _ = sk.generate(params, None, batch, max_new_tokens=32, stop_ids=[])
    alone = [sk.generate(params, None, p, max_new_tokens=32, stop_ids=[])[0] for p in batch]
    assert together == alone


def test_batch_rows_match_transformers(gqa_model):
    """A padded batch in a cache with spare rows, checked row by row against HF."""
    folder, hf = gqa_model
    params, _ = sk.load(folder, progress=False)
    batch = prompts(params.config.vocab_size, [9, 21], seed=5)
    cache = sk.init_cache(params, 3, 80)
    ours, cache = sk.generate(params, cache, batch, max_new_tokens=33, stop_ids=[])
    assert ours == [hf_greedy(hf, p, 33) for p in batch]


def test_generation_stops_at_eos_and_excludes_it(gqa_model):
    folder, hf = gqa_model
    params, _ = sk.load(folder, progress=False)
    ids = prompts(params.config.vocab_size, [12], seed=6)[0]
    ref = hf_greedy(hf, ids, 30)
    stop = ref[7]  # force a stop at the first occurrence of this token
    ours, _ = sk.generate(params, None, ids, max_new_tokens=30, stop_ids=[stop])
    assert ours == ref[:ref.index(stop)]


def test_long_prompt_uses_tiled_attention_and_matches(gqa_model):
    """Prompts past one attention tile (256) take the flash-style path."""
    folder, hf = gqa_model
    params, _ = sk.load(folder, progress=False)
    ids = prompts(params.config.vocab_size, [300], seed=7)[0]
    ref = hf_logits(hf, [ids])[0]
    cache = sk.init_cache(params, 1, 320)
    logits, cache = sk.forward(params, cache, jnp.asarray([ids[:290]]))
    assert rel_err(logits[0], ref[289]) <= 1e-4
    full, _ = sk.forward(params, None, jnp.asarray([ids]), all_logits=True)
    assert rel_err(full[0], ref) <= 1e-4


def test_bfloat16_is_close_to_float32(gqa_model):
    folder, _ = gqa_model
    params, _ = sk.load(folder, progress=False)
    ids = jnp.asarray(prompts(params.config.vocab_size, [20], seed=8))
    f32, _ = sk.forward(params, None, ids, all_logits=True)
    bf16, _ = sk.forward(params.astype(jnp.bfloat16), None, ids, all_logits=True)
    assert bf16.dtype == jnp.float32  # logits come out in f32 whatever the compute dtype
    assert 1e-4 < rel_err(bf16, f32) < 5e-2  # really computed in bf16, and still close


def test_streamed_tokens_match_transformers_and_stop_mid_group(gqa_model):
    """generate(streamer=...): the first token alone, then groups of STREAM_TOKENS; each row's
    streamed tokens are HF's greedy tokens up to its stop id (one row stops inside a group and
    must get nothing more), and generate returns the same."""
    from swiftkv_jax.runtime.generation import STREAM_TOKENS
    folder, hf = gqa_model
    params, _ = sk.load(folder, progress=False)
    batch = prompts(params.config.vocab_size, [9, 21], seed=9)
    refs = [hf_greedy(hf, p, 30) for p in batch]
    stop = refs[0][11]  # row 0 stops inside the second decode group
    want = [r[:r.index(stop)] if stop in r else r for r in refs]
    calls: list[list[list[int]]] = []
    ours, _ = sk.generate(params, None, batch, max_new_tokens=30, stop_ids=[stop], streamer=calls.append)
    assert [len(row) for row in calls[0]] == [1, 1]
    assert all(len(row) <= STREAM_TOKENS for call in calls for row in call)
    streamed = [sum((call[i] for call in calls), []) for i in range(2)]
    assert streamed == want and ours == want
