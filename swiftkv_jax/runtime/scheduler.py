"""The engine's host-side bookkeeping: the FCFS queue, the slots, and what each step runs.

Pure Python over small numpy arrays: no JAX here. Each step the scheduler picks the prefill rows
(requests already prefilling first, then waiting ones admitted into free slots while the step's
token budget, `chunk_size`, has room) and the decode rows (every slot past its prefill). A waiting
request whose prompt shares full blocks with a prompt still being prefilled waits until those
blocks are written and published, so it reuses them instead of computing them again.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import threading
from typing import Any, Callable

import numpy as np

from .request import SamplingOptions
from .shapes import chunk_bucket, pow2_at_least


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request inside the engine: its prompt, the tokens it has produced, where it stands."""

    handle: Any                # the caller's record of it (the engine's business, never read here)
    prompt: np.ndarray         # int32 token ids
    options: SamplingOptions   # checked: seed and stop ids filled in
    key: np.ndarray            # [2] uint32, the request's PRNG key
    blocks: int                # KV blocks it reserves: prompt + max_tokens
    namespace: Any             # [] uint32: the prefix-index namespace its blocks live in
    phase: Phase = Phase.WAITING
    slot: int = -1
    table: np.ndarray | None = None  # its block table, from admission
    pos: int = 0               # prompt tokens with their K/V in the cache
    kv_len: int = 0            # all its tokens with their K/V in the cache
    last: int = 0              # its last token (the next decode input)
    tokens: list[int] = dataclasses.field(default_factory=list)  # produced so far (output only)

    @property
    def prompt_left(self) -> int:
        return len(self.prompt) - self.pos

    def written(self, max_length: int) -> np.ndarray:
        """[max_length] int32: its prompt and generated tokens, zero padded."""
        row = np.zeros((max_length,), np.int32)
        seq = np.concatenate([self.prompt, np.asarray(self.tokens, np.int32)])[:max_length]
        row[:len(seq)] = seq
        return row


class Scheduler:
    """Which requests wait, which slots they hold, and which rows each step runs."""

    def __init__(self, max_slots: int, chunk_size: int, block_size: int):
        self.max_slots, self.chunk_size, self.block_size = max_slots, chunk_size, block_size
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.slots: list[Sequence | None] = [None] * max_slots
        self._prefilling: list[Sequence] = []  # in admission order
        self.lock = threading.Lock()  # guards `waiting` (submit runs on callers' threads)

    def add(self, seq: Sequence) -> None:
        with self.lock:
            self.waiting.append(seq)

    def active(self) -> list[Sequence]:
        """Requests holding a slot."""
        return [s for s in self.slots if s is not None]

    def decoding(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None and s.phase is Phase.DECODE]

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
        for other in self._prefilling:
            if other.namespace is not seq.namespace:
                continue
            shared = self._shared_blocks(seq.prompt, other.prompt)
            if shared and other.pos < shared * self.block_size:
                return True
        return False

    def plan_prefill(self, admit: Callable[[Sequence, int], bool]) -> tuple[list[tuple[Sequence, int]], int]:
        """This step's prefill rows [(request, tokens)] and the chunk width.

        Rows share one width (a power-of-two bucket of the first row's remaining prompt, at most
        chunk_size) and their number is bucketed, so rows * width never exceeds the budget.
        `admit(seq, slot)` gives a waiting request its blocks; False (the pool is full) stops
        admission for this step, first come first served.
        """
        rows: list[tuple[Sequence, int]] = []
        width = 0

        def room() -> bool:
            return not rows or pow2_at_least(len(rows) + 1) * width <= self.chunk_size

        def take(seq: Sequence) -> None:
            nonlocal width
            if not rows:
                width = chunk_bucket(min(seq.prompt_left, self.chunk_size), self.chunk_size)
            rows.append((seq, min(seq.prompt_left, width)))

        for seq in self._prefilling:
            if not room():
                break
            take(seq)
        while room():
            with self.lock:
                seq = self.waiting[0] if self.waiting else None
            slot = self._free_slot()
            if seq is None or slot is None or self._waits_for_shared_prefix(seq):
                break
            if not admit(seq, slot):
                break
            with self.lock:
                self.waiting.popleft()
            seq.phase, seq.slot = Phase.PREFILL, slot
            self.slots[slot] = seq
            self._prefilling.append(seq)
            take(seq)
        return rows, width

    def prefill_done(self, seq: Sequence) -> None:
        """The request's prompt is all in the cache: it decodes from now on."""
        self._prefilling.remove(seq)
        seq.phase = Phase.DECODE

    def remove(self, seq: Sequence) -> None:
        """Takes the request out of the queue or its slot (it ended)."""
        with self.lock:
            if seq in self.waiting:
                self.waiting.remove(seq)
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        if 0 <= seq.slot < self.max_slots and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
