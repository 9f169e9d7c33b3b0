"""The serving engine: concurrent requests answer exactly as alone, slots and blocks are always
returned, chunked prefill equals one pass, nothing recompiles after warm-up.

References: each request alone through generate() (itself checked against transformers in
test_parity_hf.py), transformers' own greedy generate for the plain model, and the uncached
forward pass for chunked prefill.
"""

from __future__ import annotations

import asyncio
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_greedy, penalised_greedy, prompts, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import swiftkv_jax as sk
from swiftkv_jax.runtime.engine import Engine, compilations
from swiftkv_jax.runtime.handle import FinishReason
from swiftkv_jax.runtime.request import GenerateError, SamplingOptions
from swiftkv_jax.runtime.scoring import SCORE_ROWS, batches, prompt_logprobs
from swiftkv_jax.runtime.steps import prefill

# One geometry for every engine here, so the suite compiles each step's shapes once per model.
GEOMETRY = dict(max_slots=4, max_length=96, block_size=8, chunk_size=32, decode_steps=4)
SHARED = prompts(160, [24], seed=7)[0]  # a 3-block "system prompt" several requests begin with


@pytest.fixture(scope="module")
def plain(gqa_model):
    folder, _ = gqa_model
    return sk.load(folder, progress=False)[0]


@pytest.fixture(scope="module", params=["plain", "swiftkv_g1", "swiftkv_g2", "qwen2_swiftkv_g2"])
def model(request, plain):
    if request.param == "swiftkv_g1":
        return sk.to_swiftkv(plain, 1, 1)
    if request.param == "swiftkv_g2":
        return sk.to_swiftkv(plain, 1, 2)
    if request.param == "qwen2_swiftkv_g2":  # biases on the lower layers' and SwiftKV's projections
        folder, _ = request.getfixturevalue("qwen2_model")
        return sk.to_swiftkv(sk.load(folder, progress=False)[0], 1, 2)
    return plain


def alone(params, prompt, max_tokens, **kw):
    """The request by itself through generate(), on a fresh cache."""
    cache = sk.init_cache(params, 1, GEOMETRY["max_length"], block_size=GEOMETRY["block_size"])
    kw.setdefault("stop_ids", [])
    return sk.generate(params, cache, prompt, max_new_tokens=max_tokens, **kw)[0]


def workload(seed: int, n: int = 12) -> list[tuple[list[int], int]]:
    """(prompt, max_tokens) pairs: lengths 1..70, a third starting with SHARED."""
    rng = np.random.default_rng(seed)
    out = []
    for i, p in enumerate(prompts(160, rng.integers(1, 46, n).tolist(), seed=seed)):
        out.append(((SHARED + p) if i % 3 == 0 else p, int(rng.integers(1, 20))))
    return out


def greedy(max_tokens: int) -> SamplingOptions:
    return SamplingOptions(max_tokens=max_tokens, stop_ids=())


def assert_all_returned(engine: Engine) -> None:
    """No slot held, no block referenced; every block free or cached."""
    s = engine.stats()
    assert s["running"] == s["waiting"] == 0
    assert (np.asarray(engine.cache.index.ref_count) == 0).all()
    assert s["blocks_in_use"] == 0 and s["blocks_cached"] + s["blocks_free"] == s["blocks_total"]


def test_concurrent_requests_equal_each_alone(model):
    """12 requests of different lengths arriving at random steps, a third sharing a prefix."""
    engine = Engine(model, **GEOMETRY)
    rng = np.random.default_rng(0)
    work, handles = workload(0), []
    while len(handles) < len(work) or not all(h.done for h in handles):
        for _ in range(int(rng.integers(0, 3))):
            if len(handles) < len(work):
                prompt, n = work[len(handles)]
                handles.append(engine.submit(prompt, greedy(n)))
        engine.step()
    for h, (prompt, n) in zip(handles, work):
        assert h.finish_reason is FinishReason.LENGTH
        assert h.tokens == alone(model, prompt, n), h
    stats = engine.stats()
    assert stats["prefix_hit_tokens"] >= 24 * 2  # later SHARED requests reused its blocks
    assert_all_returned(engine)


def test_a_shared_prompt_is_reused_while_its_first_request_still_runs(model):
    """Blocks are published as their chunk is written, and a request sharing a prefix waits for
    them instead of computing them again in the same step."""
    engine = Engine(model, **{**GEOMETRY, "chunk_size": 64})  # room for both prompts in one step
    first_tail, second_tail = prompts(160, [6, 9], seed=12)
    a = engine.submit(SHARED + first_tail, greedy(19))
    b = engine.submit(SHARED + second_tail, greedy(3))
    assert b.result() == alone(model, SHARED + second_tail, 3)
    assert b.cached_tokens == len(SHARED) and not a.done
    assert a.result() == alone(model, SHARED + first_tail, 19)
    assert_all_returned(engine)


def test_without_the_prefix_cache_nothing_is_reused_or_kept(plain):
    engine = Engine(plain, **GEOMETRY, prefix_cache=False)
    tails = prompts(160, [6, 9, 4], seed=16)
    handles = [engine.submit(SHARED + t, greedy(5)) for t in tails]
    handles.append(engine.submit(SHARED + tails[0], greedy(5)))  # the very same prompt again
    for h, t in zip(handles, tails + tails[:1]):
        assert h.result() == alone(plain, SHARED + t, 5) and h.cached_tokens == 0
    s = engine.stats()
    assert s["prefix_hit_tokens"] == 0 and s["blocks_cached"] == 0
    assert s["blocks_free"] == s["blocks_total"]  # every block is free again, none kept
    assert_all_returned(engine)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_engine_answers_like_transformers(request, family):
    folder, torch_model = request.getfixturevalue("gqa_model" if family == "llama" else "qwen2_model")
    engine = Engine(sk.load(folder, progress=False)[0], **GEOMETRY)
    work = workload(1, n=6)
    handles = [engine.submit(p, greedy(n)) for p, n in work]
    for h, (p, n) in zip(handles, work):
        assert h.result() == hf_greedy(torch_model, p, n)


def test_seeded_sampling_is_reproducible_per_request(plain):
    prompt = prompts(160, [13], seed=3)[0]
    mine = SamplingOptions(max_tokens=16, temperature=1.0, top_k=20, top_p=0.9, seed=5, stop_ids=())
    engine = Engine(plain, **GEOMETRY)
    solo = engine.submit(prompt, mine).result()
    others = [engine.submit(p, SamplingOptions(max_tokens=n, temperature=t, seed=i, stop_ids=()))
              for i, ((p, n), t) in enumerate(zip(workload(2, n=5), [0.7, 0.0, 1.3, 1.0, 0.5]))]
    crowded = engine.submit(prompt, mine)
    while not crowded.tokens:
        engine.step()
    # A long prompt arrives: its chunks carry crowded's next tokens (the mixed step).
    others.append(engine.submit(prompts(160, [80], seed=15)[0], greedy(2)))
    assert crowded.result() == solo  # same seed and prompt: same draws, whatever runs beside it
    assert solo == alone(plain, prompt, 16, temperature=1.0, top_k=20, top_p=0.9, seed=5)
    assert engine.submit(prompt, dataclasses.replace(mine, seed=6)).result() != solo
    [h.result() for h in others]
    assert_all_returned(engine)


@pytest.mark.parametrize("chunks", [[45], [8, 16, 21], [5, 27, 13], [16, 16, 13], [1, 44]])
def test_chunked_prefill_equals_one_pass(model, chunks):
    """Chunk boundaries on blocks (8, 16, 24, 32) and inside them; reference: the uncached forward."""
    tokens = prompts(160, [45], seed=11)[0]
    want, _ = sk.forward(model, None, jnp.asarray([tokens]))
    cache = sk.init_cache(model, 1, 64, block_size=8)
    start = 0
    for n in chunks:
        chunk = np.zeros((1, max(16, 1 << (n - 1).bit_length())), np.int32)
        chunk[0, :n] = tokens[start:start + n]
        logits, cache = prefill(model, cache, jnp.asarray(chunk), jnp.asarray([n], jnp.int32))
        start += n
    assert rel_err(logits[0], want[0]) <= 1e-4


def test_a_long_prompt_never_holds_up_running_requests_for_more_than_a_chunk(plain):
    """Every step while a long prompt is prefilled is one chunk and a token for each running one."""
    engine = Engine(plain, **{**GEOMETRY, "chunk_size": 16})
    running = [engine.submit(p, greedy(30)) for p in prompts(160, [5, 9], seed=13)]
    while not all(h.tokens for h in running):
        engine.step()
    long = engine.submit(prompts(160, [80], seed=14)[0], greedy(2))
    chunks = 0
    while not long.tokens:
        before = [len(h.tokens) for h in running]
        engine.step()
        chunks += 1
        assert [len(h.tokens) for h in running] == [n + 1 for n in before]
    assert chunks == 5  # 80 prompt tokens in chunks of 16


def test_cancel_mid_prefill_and_mid_decode_frees_the_slot(plain):
    engine = Engine(plain, **{**GEOMETRY, "chunk_size": 16})
    long_prompt = prompts(160, [80], seed=4)[0]
    h = engine.submit(long_prompt, greedy(8))
    engine.step()  # one chunk of 16 of its 80 prompt tokens
    assert engine.stats()["prefilling"] == 1 and not h.tokens
    h.cancel()
    engine.step()
    assert h.finish_reason is FinishReason.CANCELLED and not h.tokens
    assert_all_returned(engine)
    h = engine.submit(prompts(160, [10], seed=5)[0], greedy(40))
    while not h.tokens:
        engine.step()
    h.cancel()
    engine.step()
    assert h.finish_reason is FinishReason.CANCELLED and 0 < len(h.tokens) < 40
    assert_all_returned(engine)
    prompt = prompts(160, [30], seed=6)[0]  # the engine still answers exactly
    assert engine.submit(prompt, greedy(10)).result() == alone(plain, prompt, 10)


POOL = [p for p, _ in workload(3, n=6)]


@pytest.fixture(scope="module")
def pool_answers(plain):
    return [alone(plain, p, 12) for p in POOL]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["submit", "cancel", "step"]), st.integers(0, 5),
                          st.integers(1, 12)), min_size=1, max_size=25))
def test_random_submits_and_cancels_return_every_block(plain, pool_answers, ops):
    engine = Engine(plain, **{**GEOMETRY, "num_blocks": 24})  # room for about two requests
    handles = []
    for op, i, n in ops:
        if op == "submit":
            handles.append((engine.submit(POOL[i], greedy(n)), i, n))
        elif op == "cancel" and handles:
            handles[i % len(handles)][0].cancel()
        else:
            for _ in range(n % 4):
                engine.step()
    while any(not h.done for h, _, _ in handles):
        engine.step()
    for h, i, n in handles:
        assert h.finish_reason in (FinishReason.LENGTH, FinishReason.CANCELLED)
        assert h.tokens == pool_answers[i][:len(h.tokens)]  # exact, however far it got
        if h.finish_reason is FinishReason.LENGTH:
            assert len(h.tokens) == n
    assert_all_returned(engine)


def test_no_recompilation_after_warmup(plain):
    engine = Engine(plain, **GEOMETRY)
    engine.warmup()
    before = compilations()
    rng = np.random.default_rng(9)
    for round_ in range(3):
        work = workload(10 + round_, n=int(rng.integers(1, 9)))
        handles = [engine.submit(p, SamplingOptions(
            max_tokens=n, temperature=float(rng.choice([0.0, 0.8, 1.5])), top_k=int(rng.integers(0, 50)),
            top_p=float(rng.uniform(0.5, 1.0)), seed=int(rng.integers(1 << 30)),
            stop_ids=tuple(rng.integers(3, 160, int(rng.integers(0, 4))).tolist()),
            presence_penalty=float(rng.choice([0.0, 0.5])), frequency_penalty=float(rng.uniform(-1, 1)),
            repetition_penalty=float(rng.choice([1.0, 1.3])), min_tokens=int(rng.integers(0, n + 1)),
            logit_bias={int(t): float(rng.uniform(-5, 5)) for t in rng.integers(0, 160, rng.integers(0, 4))},
            logprobs=[None, 0, 3][int(rng.integers(0, 3))]))
            for p, n in work]
        [h.result() for h in handles]
    assert compilations() == before


def test_one_requests_penalties_and_logprobs_never_touch_another(gqa_model, plain):
    """Penalised and plain requests decoded together (mixed steps and decode loops): the plain
    ones answer as alone; the penalised ones as a NumPy loop of the formulas over transformers'
    logits; each asked-for logprob is transformers' log_softmax at its position."""
    _, hf = gqa_model
    engine = Engine(plain, **GEOMETRY)
    work = prompts(160, [9, 30, 14, 21], seed=12)
    rules = [dict(frequency_penalty=1.0, presence_penalty=0.5), {}, dict(repetition_penalty=2.0,
             logit_bias={5: 3.0}), {}]
    handles = [engine.submit(p, SamplingOptions(max_tokens=12, stop_ids=(), logprobs=2 if r else None, **r))
               for p, r in zip(work, rules)]
    for p, r, h in zip(work, rules, handles):
        got = h.result()
        if not r:
            assert got == alone(plain, p, 12) and h.logprobs == []
            continue
        assert got == penalised_greedy(hf, p, 12, frequency=r.get("frequency_penalty", 0.0),
                                       presence=r.get("presence_penalty", 0.0),
                                       repetition=r.get("repetition_penalty", 1.0), bias=r.get("logit_bias"))
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([p + got])).logits[0].double(), -1).numpy()
        np.testing.assert_allclose([lp.logprob for lp in h.logprobs],
                                   [ref[len(p) - 1 + j, t] for j, t in enumerate(got)], atol=2e-4)
        assert [[t for t, _ in lp.top] for lp in h.logprobs] == [
            np.argsort(-ref[len(p) - 1 + j])[:2].tolist() for j in range(len(got))]
    assert_all_returned(engine)


def test_prompts_scored_together_equal_each_alone(plain):
    """Prompt logprobs of prompts batched into one pass (padded rows and lengths) = one by one."""
    work = prompts(160, [1, 5, 17, 40, 9, 33], seed=30)
    together = prompt_logprobs(plain, work, [2, 0, 3, 0, 1, 2])
    for p, k, got in zip(work, [2, 0, 3, 0, 1, 2], together):
        (alone_,) = prompt_logprobs(plain, [p], [k])
        assert got[0] is None and len(got) == len(p)
        np.testing.assert_allclose([x.logprob for x in got[1:]], [x.logprob for x in alone_[1:]], atol=1e-5)
        assert [[t for t, _ in x.top] for x in got[1:]] == [[t for t, _ in x.top] for x in alone_[1:]]
        assert all(len(x.top) == k for x in got[1:])
    # in order; 2 rows x 1024 fit the 2048-token budget, a third would not; at most 8 rows
    assert SCORE_ROWS == 8 and batches([3, 700, 700, 900, 40] + [10] * 9) == [
        [0, 1], [2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12, 13]]
    assert batches([3000, 5]) == [[0], [1]]  # a prompt over the budget goes alone


class ToyGrammar:
    """A Constraint (runtime/constraint.py) that allows only the tokens of sets[i] at token i and is
    complete after the last set; it records what it was given."""

    def __init__(self, sets: list[list[int]], vocab: int):
        self.sets, self.vocab, self.given = sets, vocab, []

    def allowed(self) -> np.ndarray:
        bits = np.zeros(-(-self.vocab // 32) * 32, np.uint8)
        bits[self.sets[len(self.given)]] = 1
        return np.packbits(bits, bitorder="little").view(np.int32)

    def accept(self, token: int) -> None:
        assert token in self.sets[len(self.given)], (token, self.sets[len(self.given)])
        self.given.append(token)

    @property
    def finished(self) -> bool:
        return len(self.given) == len(self.sets)


@pytest.mark.parametrize("background", [False, True])
def test_constrained_requests_draw_only_allowed_tokens_and_never_touch_others(plain, background):
    """Grammar-constrained rows (one token per step, the host's mask before each) beside plain
    ones that keep their multi-token decode loops: each constrained token is in its allowed set
    and the request ends when its grammar is complete; the plain ones answer as alone."""
    rng = np.random.default_rng(21)
    engine = Engine(plain, **GEOMETRY)
    engine.start() if background else None
    work = prompts(160, [7, 26, 12, 19], seed=22)
    grammars = [ToyGrammar([sorted(rng.choice(160, 3, replace=False).tolist()) for _ in range(6)], 160)
                if i % 2 == 0 else None for i in range(4)]
    handles = [engine.submit(p, SamplingOptions(max_tokens=20, stop_ids=(), temperature=1.0 if g else 0.0,
                                                seed=i), constraint=g)
               for i, (p, g) in enumerate(zip(work, grammars))]
    for p, g, h in zip(work, grammars, handles):
        got = h.result(timeout=300)
        if g is None:
            assert got == alone(plain, p, 20)
        else:
            assert got == g.given and len(got) == 6 and h.finish_reason is FinishReason.STOP
    engine.stop()
    assert_all_returned(engine)


def test_pool_pressure_makes_requests_wait_and_a_request_that_never_fits_is_refused(plain):
    engine = Engine(plain, **{**GEOMETRY, "num_blocks": 12})  # one full row: two 5-block requests
    work = [(p, 10) for p in prompts(160, [30, 28, 33, 25, 31, 29], seed=8)]
    handles = [engine.submit(p, greedy(n)) for p, n in work]
    engine.step()
    assert engine.stats()["waiting"] >= 3  # free slots, but the pool holds only two
    for h, (p, n) in zip(handles, work):
        assert h.result() == alone(plain, p, n)
    with pytest.raises(GenerateError, match="max_length"):
        engine.submit(prompts(160, [90], seed=9)[0], greedy(7))
    assert_all_returned(engine)


def test_streaming_with_a_background_loop_plain_and_async(plain):
    work = workload(4, n=5)
    want = [alone(plain, p, n) for p, n in work]
    long_prompt, long_answer = work[0][0][:8], 80  # ~20 steps: the reader wakes before the end
    want_long = alone(plain, long_prompt, long_answer)
    with Engine(plain, **GEOMETRY) as engine:
        h = engine.submit(long_prompt, greedy(long_answer))
        seen = []
        for token in h:
            seen.append((token, len(h.tokens)))
        assert [t for t, _ in seen] == want_long
        assert seen[0][1] < len(want_long)  # tokens came while the request ran

        async def read(handle):
            return [t async for t in handle]

        async def main():
            hs = [engine.submit(p, greedy(n)) for p, n in work]
            return await asyncio.gather(*(read(x) for x in hs))

        assert asyncio.run(main()) == want
    assert not engine.running


@pytest.mark.parametrize("prompt,options,message", [
    ([1, 2, 500], greedy(4), "outside the vocabulary"),
    ([], greedy(4), "empty"),
    ([1, 2], SamplingOptions(max_tokens=0), "max_tokens"),
    ([1, 2], SamplingOptions(temperature=-1.0), "temperature"),
    ([1, 2], SamplingOptions(top_p=1.5), "top_p"),
    ("some text", greedy(4), "token ids"),
])
def test_a_bad_request_is_refused_and_harms_no_other(plain, prompt, options, message):
    engine = Engine(plain, **GEOMETRY)
    work = workload(5, n=3)
    handles = [engine.submit(p, greedy(n)) for p, n in work]
    engine.step()
    with pytest.raises(GenerateError, match=message):
        engine.submit(prompt, options)
    for h, (p, n) in zip(handles, work):
        assert h.result() == alone(plain, p, n)


def test_stats_count_requests_tokens_and_latencies(plain):
    engine = Engine(plain, **GEOMETRY)
    work = workload(6, n=6)
    handles = [engine.submit(p, greedy(n)) for p, n in work]
    [h.result() for h in handles]
    s = engine.stats()
    assert s["finished"]["length"] == 6 and s["decode_tokens"] == sum(n - 1 for _, n in work)
    assert s["prefill_tokens"] + s["prefix_hit_tokens"] == sum(len(p) for p, _ in work)
    assert 0 < s["ttft_p50_s"] <= s["ttft_p99_s"]
    assert s["tokens_per_step"] > 1
