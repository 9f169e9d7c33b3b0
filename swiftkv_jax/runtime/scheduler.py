"""The engine's host-side bookkeeping: the FCFS queue, the slots, the pool's blocks, and a plan
for each step. Pure Python over small numpy arrays: no JAX here, so it is tested on plans alone.

A step is planned in two parts, each a plain value the runner executes (vLLM's scheduler output):
  * `admit()`: waiting requests that get a free slot now, first come first served, while the
    pool has room for their blocks (counted on the host: every block a running request reserved
    counts, so the device's admission always succeeds) and the step's token budget (`chunk_size`)
    has room for their prompts. A request whose prompt shares full blocks with a prompt still
    being prefilled waits until those are written and published, so it reuses them instead of
    computing them again.
  * `plan()`, once the admitted requests' cached prefixes are known: the prefill chunk's rows
    (requests prefilling, in admission order, while the budget has room) and the decode rows
    (every slot past its prefill), and how many decode steps to run.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import threading
from typing import Any

import numpy as np

from .request import SamplingOptions
from .shapes import chunk_bucket, pow2_at_least


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    ENDED = "ended"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request inside the engine: its prompt, the tokens it has produced, where it stands."""

    handle: Any                # the caller's record of it (the engine's business, never read here)
    prompt: np.ndarray         # int32 token ids
    options: SamplingOptions   # checked: seed and stop ids filled in
    blocks: int                # KV blocks it reserves: prompt + max_tokens
    phase: Phase = Phase.WAITING
    slot: int = -1
    pos: int = 0               # prompt tokens with their K/V in the cache
    tokens: list[int] = dataclasses.field(default_factory=list)  # produced so far (output only)
    constraint: Any = None     # a grammar (runtime/constraint.py): one token per step, mask first
    held: bool = False         # a constrained request whose last token the host has not seen yet

    @property
    def prompt_left(self) -> int:
        return len(self.prompt) - self.pos


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One step's device work: a prefill chunk of `width` tokens per row (`prefill`: the request
    and how many of its prompt tokens run) with one decode token for every `decode` row, or, with
    no prefill rows, `decode_steps` decode steps for the `decode` rows."""

    prefill: tuple[tuple[Sequence, int], ...] = ()
    width: int = 0
    decode: tuple[Sequence, ...] = ()
    decode_steps: int = 1

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    """Which requests wait, which slots and blocks they hold, and what each step runs."""

    def __init__(self, max_slots: int, chunk_size: int, block_size: int, num_blocks: int,
                 decode_steps: int = 1, share_prefixes: bool = True, grammar_steps: int | None = None):
        self.max_slots, self.chunk_size, self.block_size = max_slots, chunk_size, block_size
        self.num_blocks, self.decode_steps, self.share_prefixes = num_blocks, decode_steps, share_prefixes
        self.grammar_steps = decode_steps if grammar_steps is None else grammar_steps
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.slots: list[Sequence | None] = [None] * max_slots
        self.reserved = 0  # blocks reserved by the requests holding slots
        self._prefilling: list[Sequence] = []  # in admission order
        self.lock = threading.Lock()  # guards `waiting` (submit runs on callers' threads)

    def add(self, seq: Sequence) -> None:
        with self.lock:
            self.waiting.append(seq)

    def active(self) -> list[Sequence]:
        """Requests holding a slot."""
        return [s for s in self.slots if s is not None]

    def decoding(self) -> list[Sequence]:
        """Requests past their prefill that can take a token now (not `held`)."""
        return [s for s in self.slots if s is not None and s.phase is Phase.DECODE and not s.held]

    def prefilling(self) -> list[Sequence]:
        return list(self._prefilling)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def _free_slot(self) -> int | None:
        return next((i for i, s in enumerate(self.slots) if s is None), None)

    def _shared_blocks(self, a: np.ndarray, b: np.ndarray) -> int:
        """Leading full blocks `a` (a new prompt; its last token is never taken from the cache)
        shares with `b`."""
        n = min(len(a) - 1, len(b)) // self.block_size * self.block_size
        differ = np.flatnonzero(a[:n] != b[:n])
        return (int(differ[0]) if differ.size else n) // self.block_size

    def _waits_for_shared_prefix(self, seq: Sequence) -> bool:
        """Whether a prompt being prefilled will soon publish blocks this one could reuse."""
        if not self.share_prefixes:
            return False
        for other in self._prefilling:
            shared = self._shared_blocks(seq.prompt, other.prompt)
            if shared and other.pos < shared * self.block_size:
                return True
        return False

    def _chunk_rows(self, seqs: list[Sequence]) -> tuple[list[tuple[Sequence, int]], int]:
        """The rows of `seqs` (in order) one chunk holds, with how many prompt tokens each runs,
        and the chunk width. Rows share one width (a power-of-two bucket of the first row's
        remaining prompt, at most chunk_size) and their number is bucketed, so rows * width never
        exceeds the budget."""
        rows: list[tuple[Sequence, int]] = []
        width = 0
        for seq in seqs:
            if not rows:
                width = chunk_bucket(min(seq.prompt_left, self.chunk_size), self.chunk_size)
            elif pow2_at_least(len(rows) + 1) * width > self.chunk_size:
                break
            rows.append((seq, min(seq.prompt_left, width)))
        return rows, width

    def admit(self) -> list[Sequence]:
        """Waiting requests that take a free slot this step (their `slot` is set; first come first
        served): while a slot is free, the pool has room for their blocks, and this step's chunk
        has room for their prompts as far as the host knows them (a cached prefix found at
        admission only shortens a prompt). The runner then looks up their cached prefixes."""
        admitted: list[Sequence] = []
        while True:
            with self.lock:
                seq = self.waiting[0] if self.waiting else None
            slot = self._free_slot()
            if (seq is None or slot is None or self.reserved + seq.blocks > self.num_blocks
                    or self._waits_for_shared_prefix(seq)):
                break
            rows, _ = self._chunk_rows(self._prefilling + [seq])
            if rows[-1][0] is not seq:
                break
            with self.lock:
                self.waiting.popleft()
            seq.phase, seq.slot = Phase.PREFILL, slot
            self.slots[slot] = seq
            self.reserved += seq.blocks
            self._prefilling.append(seq)
            admitted.append(seq)
        return admitted

    def plan(self) -> StepPlan:
        """This step's rows, once every admitted request's position is known: a chunk of the
        prefilling requests with a decode token for each decoding one, or, when none prefills,
        up to `decode_steps` decode steps (never more than a row still needs; at most
        `grammar_steps` while a grammar-constrained request runs, which takes one token a step)."""
        rows, width = self._chunk_rows(self._prefilling)
        decoding = tuple(self.decoding())
        if rows:
            return StepPlan(tuple(rows), width, decoding, 1)
        need = max((s.options.max_tokens - len(s.tokens) for s in decoding), default=0)
        steps = self.decode_steps
        if any(s.constraint is not None for s in self.active()):  # it takes one token per step
            steps = min(steps, self.grammar_steps)
        return StepPlan(decode=decoding, decode_steps=max(1, min(steps, need)))

    def prefilled(self, seq: Sequence, n: int) -> None:
        """`n` more prompt tokens of the request are in the cache; with the whole prompt there,
        it decodes from now on."""
        seq.pos += n
        if not seq.prompt_left:
            self._prefilling.remove(seq)
            seq.phase = Phase.DECODE

    def remove(self, seq: Sequence) -> None:
        """Takes the request out of the queue or its slot (it ended)."""
        seq.phase = Phase.ENDED
        with self.lock:
            if seq in self.waiting:
                self.waiting.remove(seq)
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        if 0 <= seq.slot < self.max_slots and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
            self.reserved -= seq.blocks
