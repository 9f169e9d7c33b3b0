"""The scheduler on plans alone, without JAX: first come first served admission into free slots,
the chunk's token budget, the pool's blocks, shared prefixes, cancellation, decode steps.

Each step here is what the engine does with a plan: admit(), the runner's cached-prefix answer
(none here unless a test gives one), plan(), then prefilled() for each chunk row."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from swiftkv_jax.runtime.request import SamplingOptions
from swiftkv_jax.runtime.scheduler import Phase, Scheduler, Sequence, StepPlan

BLOCK = 8


def request(prompt_len: int, max_tokens: int = 4, first: int = 0) -> Sequence:
    """A request of `prompt_len` tokens (first, first + 1, ...) and its block reservation."""
    blocks = -(-(prompt_len + max_tokens) // BLOCK)
    return Sequence(handle=None, prompt=np.arange(first, first + prompt_len, dtype=np.int32),
                    options=SamplingOptions(max_tokens=max_tokens, seed=0, stop_ids=()), blocks=blocks)


def scheduler(slots: int = 4, chunk: int = 64, blocks: int = 1000, decode_steps: int = 8) -> Scheduler:
    return Scheduler(slots, chunk, BLOCK, blocks, decode_steps)


def run_step(s: Scheduler) -> tuple[list[Sequence], StepPlan]:
    """One step as the engine runs it (no cached prefixes): admit, plan, advance the chunk."""
    admitted = s.admit()
    plan = s.plan()
    for seq, n in plan.prefill:
        s.prefilled(seq, n)
    return admitted, plan


def test_the_scheduler_needs_no_jax():
    code = ("import sys, swiftkv_jax.runtime.scheduler; "
            "sys.exit(1 if any(m == 'jax' or m.startswith('jax.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_requests_are_admitted_first_come_first_served_into_free_slots():
    s = scheduler(slots=3, chunk=64)
    reqs = [request(8, first=100 * i) for i in range(5)]
    for r in reqs:
        s.add(r)
    admitted, plan = run_step(s)
    assert admitted == reqs[:3] and [r.slot for r in admitted] == [0, 1, 2]
    assert list(s.waiting) == reqs[3:]
    assert [(r, n) for r, n in plan.prefill] == [(r, 8) for r in reqs[:3]]
    s.remove(reqs[1])  # a slot frees up: the next in line takes it
    admitted, _ = run_step(s)
    assert admitted == [reqs[3]] and reqs[3].slot == 1 and list(s.waiting) == [reqs[4]]


def test_a_chunk_never_exceeds_the_token_budget():
    s = scheduler(slots=4, chunk=64)
    long, short_a, short_b = request(100, first=0), request(10, first=200), request(10, first=300)
    for r in (long, short_a, short_b):
        s.add(r)
    admitted, plan = run_step(s)
    assert admitted == [long] and plan.width == 64 and plan.prefill == ((long, 64),)
    # 36 left: a 64-wide row again, so no room for another row of the same width.
    admitted, plan = run_step(s)
    assert admitted == [] and plan.prefill == ((long, 36),) and long.phase is Phase.DECODE
    # The long prompt is done: the two short ones share a 16-wide chunk (2 rows x 16 <= 64),
    # with a decode token for the long one.
    admitted, plan = run_step(s)
    assert admitted == [short_a, short_b] and plan.width == 16
    assert plan.prefill == ((short_a, 10), (short_b, 10)) and plan.decode == (long,)
    for step in range(6):
        _, plan = run_step(s)
        assert len(plan.prefill) * plan.width <= 64


def test_requests_wait_while_the_pool_cannot_hold_their_blocks():
    s = scheduler(slots=4, blocks=10)
    reqs = [request(20, 12, first=100 * i) for i in range(3)]  # 4 blocks each
    for r in reqs:
        s.add(r)
    admitted, _ = run_step(s)
    assert admitted == reqs[:2] and s.reserved == 8  # a third would need 12 of 10 blocks
    assert run_step(s)[0] == []
    s.remove(reqs[0])
    assert s.reserved == 4 and run_step(s)[0] == [reqs[2]]


def test_a_prompt_sharing_blocks_with_one_being_prefilled_waits_for_them():
    s = scheduler(slots=4, chunk=64)
    shared = request(20, first=0)
    follower = request(20, first=0)  # the same first 2 blocks, then its own
    follower.prompt[16:] += 1000
    s.add(shared)
    s.add(follower)
    # The chunk has room for both (2 rows x 32 <= 64), but the follower waits for shared's blocks.
    admitted, plan = run_step(s)
    assert admitted == [shared] and list(s.waiting) == [follower]
    admitted, plan = run_step(s)  # shared's blocks are written (and published by the runner)
    assert admitted == [follower] and plan.decode == (shared,)
    # A prompt sharing nothing does not wait; without prefix sharing nothing waits.
    for other, share in ((request(20, first=500), True), (request(20, first=0), False)):
        s = Scheduler(4, 64, BLOCK, 1000, 8, share_prefixes=share)
        s.add(request(20, first=0))
        s.add(other)
        assert len(s.admit()) == 2


def test_cancelled_requests_leave_the_queue_their_slot_and_the_plans():
    s = scheduler(slots=2, chunk=64)
    running, prefilling, waiting = request(8, first=0), request(100, first=200), request(8, first=400)
    for r in (running, prefilling, waiting):
        s.add(r)
    run_step(s)  # running prefilled, prefilling not yet admitted (budget) ...
    run_step(s)  # ... now it is, in slot 1; waiting has no slot
    assert running.phase is Phase.DECODE and prefilling.phase is Phase.PREFILL
    s.remove(waiting)
    s.remove(prefilling)
    assert not s.waiting and s.slots == [running, None] and s.reserved == running.blocks
    plan = s.plan()
    assert plan.prefill == () and plan.decode == (running,)
    s.remove(running)
    assert not s.has_work() and s.plan().empty and s.reserved == 0


def test_decode_steps_never_exceed_what_a_row_still_needs():
    s = scheduler(slots=2, decode_steps=8)
    r = request(8, max_tokens=5)
    s.add(r)
    run_step(s)
    r.tokens.append(1)  # its first token came with the chunk
    plan = s.plan()
    assert plan.decode == (r,) and plan.decode_steps == 4
    r2 = request(8, max_tokens=30, first=50)
    s.add(r2)
    _, plan = run_step(s)  # a chunk: one decode token beside it
    assert plan.prefill == ((r2, 8),) and plan.decode == (r,) and plan.decode_steps == 1
    r2.tokens.append(1)
    plan = s.plan()
    assert plan.decode == (r, r2) and plan.decode_steps == 8  # the longer need sets the steps
