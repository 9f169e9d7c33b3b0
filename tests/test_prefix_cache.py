"""Prefix reuse: cached prompts give the cold answer; the on-device index keeps its invariants."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import prompts, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import swiftkv_jax as sk
from swiftkv_jax.runtime.generation import GenerateError, _admit, make_request, namespace_of, prefill
from swiftkv_jax.runtime.prefix_cache import admit, empty_index, register

BS = 8  # block size of these tests


@pytest.fixture(scope="module", params=["plain", "swiftkv_g1", "swiftkv_g2", "qwen2"])
def model(request, gqa_model):
    folder, _ = request.getfixturevalue("qwen2_model") if request.param == "qwen2" else gqa_model
    params, _ = sk.load(folder, progress=False)  # 3 layers
    if request.param == "swiftkv_g1":
        params = sk.to_swiftkv(params, 1, 1)
    elif request.param == "swiftkv_g2":
        params = sk.to_swiftkv(params, 1, 2)
    return params


def first_logits(params, cache, batch):
    """Last-prompt-token logits through generate's own admit + prefill path (cached part skipped)."""
    req = make_request(params, cache, batch, 1)
    cache = jax.tree.map(jnp.copy, cache)  # prefill donates its cache; keep the caller's
    cache, hit = _admit(cache, req, namespace_of(params.weights))
    suffix = np.zeros((cache.batch_size, 64), np.int32)
    for i, row in enumerate(req.rows):
        suffix[i, :len(row) - hit[i]] = row[hit[i]:]
    logits, _ = prefill(params, cache, jnp.asarray(suffix), jnp.asarray(req.lengths - hit))
    return np.asarray(logits[:len(batch)]), hit


@pytest.mark.parametrize("shared", [20, 24], ids=["prefix_inside_block", "prefix_on_boundary"])
def test_cached_prompt_equals_cold(model, shared):
    vocab = model.config.vocab_size
    prefix = prompts(vocab, [shared], seed=1)[0]
    first, second = (prefix + tail for tail in prompts(vocab, [9, 13], seed=2))
    warm = sk.init_cache(model, 1, 96, block_size=BS, num_blocks=40)
    _, warm = sk.generate(model, warm, first, max_new_tokens=8)
    hits_before = warm.stats()["hit_tokens"]
    warm_logits, hit = first_logits(model, warm, [second])
    assert hit[0] == (shared // BS) * BS  # whole blocks of the shared prefix, nothing more
    cold_logits, cold_hit = first_logits(model, sk.init_cache(model, 1, 96, block_size=BS), [second])
    assert cold_hit[0] == 0
    assert rel_err(warm_logits, cold_logits) <= 1e-4
    warm_ids, warm = sk.generate(model, warm, second, max_new_tokens=24, stop_ids=[])
    cold_ids, _ = sk.generate(model, None, second, max_new_tokens=24, stop_ids=[])
    assert warm_ids == cold_ids
    assert warm.stats()["hit_tokens"] - hits_before == hit[0]


def test_whole_prompt_cached_still_computes_one_token(model):
    ids = prompts(model.config.vocab_size, [32], seed=3)[0]  # exactly 4 blocks
    cache = sk.init_cache(model, 1, 64, block_size=BS, num_blocks=20)
    cold, cache = sk.generate(model, cache, ids, max_new_tokens=6, stop_ids=[])
    again, cache = sk.generate(model, cache, ids, max_new_tokens=6, stop_ids=[])
    assert again == cold and cache.stats()["hit_tokens"] == 24  # 3 of 4 blocks: one token left


def test_batched_requests_reuse_and_match_cold(model):
    vocab = model.config.vocab_size
    system = prompts(vocab, [27], seed=4)[0]
    questions = prompts(vocab, [5, 11, 8], seed=5)
    batch = [system + q for q in questions]
    cache = sk.init_cache(model, 3, 64, block_size=BS, num_blocks=60)
    _, cache = sk.generate(model, cache, [system + [7, 7]], max_new_tokens=2)  # warm the system prompt
    warm, cache = sk.generate(model, cache, batch, max_new_tokens=20, stop_ids=[])
    cold = [sk.generate(model, None, b, max_new_tokens=20, stop_ids=[])[0] for b in batch]
    assert warm == cold
    assert cache.stats()["hit_tokens"] == 3 * 24


def test_multi_turn_chat_reuses_the_answer(model):
    vocab = model.config.vocab_size
    turn1 = prompts(vocab, [19], seed=6)[0]
    cache = sk.init_cache(model, 1, 128, block_size=BS, num_blocks=40)
    answer, cache = sk.generate(model, cache, turn1, max_new_tokens=21, stop_ids=[])
    turn2 = turn1 + answer + prompts(vocab, [6], seed=7)[0]
    before = cache.stats()["hit_tokens"]
    warm, cache = sk.generate(model, cache, turn2, max_new_tokens=16, stop_ids=[])
    # The answer's last token was sampled but never fed back, so its KV is not in the cache.
    assert cache.stats()["hit_tokens"] - before == ((19 + 21 - 1) // BS) * BS
    assert warm == sk.generate(model, None, turn2, max_new_tokens=16, stop_ids=[])[0]


def test_forced_hash_collisions_never_give_a_wrong_answer(model):
    vocab = model.config.vocab_size
    cache = sk.init_cache(model, 1, 96, block_size=BS, num_blocks=60, hash_mask=0x1)  # 2 hashes
    rng = np.random.default_rng(8)
    bases = prompts(vocab, [24, 24, 24], seed=9)
    for step in range(6):
        ids = bases[rng.integers(3)] + prompts(vocab, [5], seed=10 + step)[0]
        got, cache = sk.generate(model, cache, ids, max_new_tokens=10, stop_ids=[])
        assert got == sk.generate(model, None, ids, max_new_tokens=10, stop_ids=[])[0]
    assert cache.stats()["hit_tokens"] > 0


def test_new_weights_never_hit_old_blocks(gqa_model):
    folder, _ = gqa_model
    params, _ = sk.load(folder, progress=False)
    other = sk.Params(jax.tree.map(lambda x: x * 1.01, params.weights), params.config)
    ids = prompts(params.config.vocab_size, [30], seed=11)[0]
    cache = sk.init_cache(params, 1, 64, block_size=BS, num_blocks=30)
    _, cache = sk.generate(params, cache, ids, max_new_tokens=4)
    out, cache = sk.generate(other, cache, ids, max_new_tokens=4, stop_ids=[])
    assert cache.stats()["hit_tokens"] == 0
    assert out == sk.generate(other, None, ids, max_new_tokens=4, stop_ids=[])[0]
    _, cache = sk.generate(params, cache, ids, max_new_tokens=4)  # the first weights hit again
    assert cache.stats()["hit_tokens"] == 24
    cache = cache.clear()
    _, cache = sk.generate(params, cache, ids, max_new_tokens=4)
    assert cache.stats()["hit_tokens"] == 24  # counters survive clear(); the cleared blocks did not hit


def test_pool_too_small_is_a_clear_error_and_changes_nothing(gqa_model):
    folder, _ = gqa_model
    params, _ = sk.load(folder, progress=False)
    cache = sk.init_cache(params, 2, 64, block_size=BS, num_blocks=8)
    _, cache = sk.generate(params, cache, [[5] * 20, [6] * 9], max_new_tokens=4)
    before = jax.tree.map(np.asarray, (cache.index, cache.block_table, cache.lengths))
    with pytest.raises(GenerateError, match="pool has 8 blocks"):
        sk.generate(params, cache, [[7] * 40, [8] * 30], max_new_tokens=8)
    after = jax.tree.map(np.asarray, (cache.index, cache.block_table, cache.lengths))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


# -- property tests on the index alone (no model: admit and register are pure functions) ---------

def _request(draw, rows, per_row, vocab=4):
    """Prompts over a tiny alphabet (so prefixes collide and repeat), lengths and answer sizes."""
    lengths, written, toks = [], [], np.zeros((rows, per_row * BS), np.int32)
    for r in range(rows):
        n = draw(st.integers(0, per_row * BS - 1))
        extra = draw(st.integers(1, per_row * BS - n)) if n else 0
        toks[r, :n + extra] = draw(st.lists(st.integers(0, vocab - 1), min_size=n + extra,
                                            max_size=n + extra))
        lengths.append(n)
        written.append(n + extra - 1 if n else 0)
    return toks, np.array(lengths, np.int32), np.array(written, np.int32)


def _check_queue(idx):
    """The block queue: the free stack holds exactly the free blocks (unregistered, unreferenced),
    the eviction log's live entries exactly the idle cached blocks, each once, and a cached child
    comes before its cached parent there (so eviction never strands a reachable chain)."""
    q = jax.tree.map(np.asarray, idx.queue)
    reg, refs = np.asarray(idx.registered), np.asarray(idx.ref_count)
    parent, parent_gen, gen = (np.asarray(x) for x in (idx.block_parent, idx.block_parent_gen, idx.block_gen))
    free = list(q.free_stack[:int(q.free_top)])
    assert sorted(free) == list(np.flatnonzero(~reg & (refs == 0)))
    log = [int(b) for p, b in enumerate(q.log_block[:int(q.log_tail)])
           if p >= int(q.log_head) and q.stamp[b] == p and reg[b] and refs[b] == 0]
    assert sorted(log) == list(np.flatnonzero(reg & (refs == 0)))
    place = {b: i for i, b in enumerate(log)}
    for b in log:
        p = parent[b]
        if p >= 0 and p in place and gen[p] == parent_gen[b]:
            assert place[b] < place[p]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_index_invariants_over_random_requests(data):
    # Fixed array shapes (each new shape compiles admit/register again): 3 rows of 4 blocks, some
    # rows unused (length 0) in a request; a pool exactly full, nearly full or roomy.
    rows, per_row = 3, 4
    pool = data.draw(st.sampled_from([rows * per_row, rows * per_row + 2, rows * per_row + 6]))
    mask = data.draw(st.sampled_from([0xFFFFFFFF, 0x3]))
    idx = empty_index(pool, BS, mask)
    table = jnp.zeros((rows, per_row), jnp.int32)
    ns = jnp.uint32(7)
    content: dict[int, tuple] = {}  # block id -> tokens whose KV it holds (our shadow of the pool)
    for _ in range(data.draw(st.integers(1, 6))):
        toks, lengths, written = _request(data.draw, rows, per_row)
        needed = np.where(lengths > 0, -(-(written + 1) // BS), 0).astype(np.int32)
        old = jax.tree.map(np.asarray, idx)
        idx, table, hit, ok = admit(idx, table, jnp.asarray(toks), jnp.asarray(lengths),
                                    jnp.asarray(needed), ns)
        assert bool(ok)  # the pool always holds one request here
        refs, tab, hit = np.asarray(idx.ref_count), np.asarray(table), np.asarray(hit)
        assert (refs >= 0).all()
        _check_queue(idx)
        for r in range(rows):
            assert hit[r] < max(lengths[r], 1)  # at least one prompt token is computed
            for j in range(hit[r] // BS):  # a hit holds exactly this row's tokens
                assert content[int(tab[r, j])] == tuple(toks[r, j * BS:(j + 1) * BS])
        hits = {int(tab[r, j]) for r in range(rows) for j in range(hit[r] // BS)}
        fresh = [int(tab[r, j]) for r in range(rows) for j in range(hit[r] // BS, needed[r])]
        assert len(set(fresh)) == len(fresh)  # no block handed to two places
        assert not set(fresh) & hits  # a referenced block is never evicted or reused
        # LRU: every evicted block was no more recent than any cached block left unevicted.
        evicted = [b for b in set(fresh) if old.registered[b]]
        kept = [b for b in range(pool) if old.registered[b] and old.ref_count[b] == 0
                and b not in fresh and b not in hits]
        if evicted and kept:
            assert max(old.last_used[evicted]) <= min(old.last_used[kept])
        if evicted:  # free blocks are handed out before any cached one is evicted
            assert {b for b in range(pool) if not old.registered[b] and old.ref_count[b] == 0} <= set(fresh)
        for b in fresh:
            content.pop(b, None)
        for r in range(rows):  # the model would write these tokens' KV
            for j in range(hit[r] // BS, written[r] // BS):
                content[int(tab[r, j])] = tuple(toks[r, j * BS:(j + 1) * BS])
        idx = register(idx, table, jnp.asarray(toks), jnp.asarray(written), jnp.asarray(needed), ns)
        reg, refs = np.asarray(idx.registered), np.asarray(idx.ref_count)
        assert (refs == 0).all()  # every reference released
        _check_queue(idx)
        parent, depth, tokens = (np.asarray(x) for x in (idx.block_parent, idx.block_depth, idx.block_tokens))
        for b in np.flatnonzero(reg):  # every cached block: its tokens and its chain are real
            assert tuple(tokens[b]) == content[int(b)]
            if depth[b] == 0:
                assert parent[b] == -1
            else:
                assert reg[parent[b]] and depth[parent[b]] == depth[b] - 1


def test_the_block_queue_appends_a_block_once_per_call_at_its_last_place_and_slides():
    from swiftkv_jax.runtime.block_queue import full_queue, put, take

    n = 4
    q = full_queue(n)
    q, ids, evicted = take(q, jnp.int32(4), jnp.zeros(n, bool), 4)
    assert sorted(np.asarray(ids).tolist()) == [0, 1, 2, 3] and int(evicted) == 0 and int(q.free_top) == 0
    cached = jnp.ones(n, bool)  # all four now cached and idle
    no = jnp.zeros(5, bool)
    q = put(q, jnp.asarray([2, 0, 1, 2, 3]), jnp.ones(5, bool), no, cached)
    assert int(q.log_tail) - int(q.log_head) == 4  # block 2 once, at its second place
    q, ids, evicted = take(q, jnp.int32(4), cached, 4)
    assert np.asarray(ids).tolist() == [0, 1, 2, 3] and int(evicted) == 4
    for _ in range(5):  # 20 appends into a 16-entry log: it slides, nothing is lost
        q = put(q, jnp.asarray([3, 1, 0, 2, 0]), jnp.ones(5, bool), no, cached)
    q, ids, _ = take(q, jnp.int32(4), cached, 4)
    assert np.asarray(ids).tolist() == [3, 1, 2, 0] and int(q.log_tail) <= q.log_block.size
