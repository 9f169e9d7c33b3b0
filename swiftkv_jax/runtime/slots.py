"""What the engine keeps on the device per slot between steps: each request's tokens so far, its
token budget, stop ids, sampling values and key, written once at admission (`insert`) and then
advanced by the steps themselves, so a step sends the device only which slots it runs and
fetches its results in one transfer (JetStream's decode state; vLLM's persistent batch).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .logits import LogitRules
from .request import MAX_STOP_IDS, SamplingOptions
from .sampling import SamplingParams
from .steps import seed_keys


@struct.dataclass
class SlotState:
    """Per-slot request state, arrays over the engine's S slots (rows of the KV cache).

    tokens:     [S, max_length] the prompt then the generated tokens (what the prefix index
                publishes as the row's blocks' content)
    prompt_len: [S] prompt tokens
    last:       [S] the last token, not yet in the cache (the next decode input)
    counts:     [S] tokens produced so far
    max_tokens: [S] the token budget (0 in a free slot: a free slot is always done)
    stop_ids:   [S, MAX_STOP_IDS] -1 padded
    sampling:   per-slot temperature / top_k / top_p
    keys:       [S, 2] uint32, each request's PRNG key (token i draws with fold_in(key, i))
    rules:      per-slot penalties, logit_bias, min_tokens, logprobs wanted (logits.py)
    """

    tokens: jax.Array
    prompt_len: jax.Array
    last: jax.Array
    counts: jax.Array
    max_tokens: jax.Array
    stop_ids: jax.Array
    sampling: SamplingParams
    keys: jax.Array
    rules: LogitRules

    def rows(self, slots: jax.Array) -> "SlotState":
        """The state of rows `slots` [R]; an id past the last slot (padding) reads as a free slot."""
        take = lambda x: jnp.take(x, slots, axis=0, mode="fill", fill_value=0)
        return jax.tree.map(take, self.replace(rules=None)).replace(rules=self.rules.rows(slots))

    def set_rows(self, slots: jax.Array, rows: "SlotState") -> "SlotState":
        """This state with rows `slots` [R] replaced by `rows` (padding ids are dropped)."""
        return jax.tree.map(lambda x, r: x.at[slots].set(r, mode="drop"), self, rows)


def empty_slots(max_slots: int, max_length: int, vocab_size: int) -> SlotState:
    """The state of `max_slots` free slots (of a model with `vocab_size` tokens)."""
    zeros = lambda *shape: jnp.zeros(shape, jnp.int32)
    return SlotState(tokens=zeros(max_slots, max_length), prompt_len=zeros(max_slots),
                     last=zeros(max_slots), counts=zeros(max_slots), max_tokens=zeros(max_slots),
                     stop_ids=jnp.full((max_slots, MAX_STOP_IDS), -1, jnp.int32),
                     sampling=SamplingParams.make(jnp.zeros(max_slots), zeros(max_slots),
                                                  jnp.ones(max_slots)),
                     keys=jnp.zeros((max_slots, 2), jnp.uint32), rules=LogitRules.none(max_slots, vocab_size))


@struct.dataclass
class Admission:
    """Host-side rows for `insert`, numpy arrays over the R admitted requests (padded rows have
    prompt_len 0 and a slot id past the last)."""

    slots: np.ndarray        # [R] int32
    prompts: np.ndarray      # [R, max_length] int32, zero padded
    prompt_len: np.ndarray   # [R] int32
    blocks: np.ndarray       # [R] int32 KV blocks reserved (prompt + max_tokens)
    max_tokens: np.ndarray   # [R] int32
    stop_ids: np.ndarray     # [R, MAX_STOP_IDS] int32
    temperature: np.ndarray  # [R] float32
    top_k: np.ndarray        # [R] int32
    top_p: np.ndarray        # [R] float32
    seeds: np.ndarray        # [R] uint32
    rules: LogitRules        # of numpy arrays over the R rows (logits.py)

    @classmethod
    def padded(cls, rows: int, max_length: int, pad_slot: int, vocab_size: int) -> "Admission":
        """`rows` empty rows (fill them in place, one request per row)."""
        i32 = lambda *shape: np.zeros(shape, np.int32)
        return cls(slots=np.full((rows,), pad_slot, np.int32), prompts=i32(rows, max_length),
                   prompt_len=i32(rows), blocks=i32(rows), max_tokens=i32(rows),
                   stop_ids=np.full((rows, MAX_STOP_IDS), -1, np.int32),
                   temperature=np.zeros(rows, np.float32), top_k=i32(rows),
                   top_p=np.ones(rows, np.float32), seeds=np.zeros(rows, np.uint32),
                   rules=LogitRules.none(rows, vocab_size, xp=np))

    def fill(self, row: int, slot: int, prompt: np.ndarray, blocks: int, o: SamplingOptions,
             allowed: np.ndarray | None = None) -> None:
        """Writes one request (checked options `o`; a constrained one's first mask) into row `row`."""
        self.slots[row], self.prompt_len[row], self.blocks[row] = slot, len(prompt), blocks
        self.prompts[row, :len(prompt)] = prompt
        self.max_tokens[row], self.stop_ids[row], self.seeds[row] = o.max_tokens, o.stop_row(), o.seed
        self.temperature[row], self.top_k[row], self.top_p[row] = o.temperature, o.top_k, o.top_p
        r = self.rules
        r.presence[row], r.frequency[row] = o.presence_penalty, o.frequency_penalty
        r.repetition[row], r.min_tokens[row] = o.repetition_penalty, o.min_tokens
        r.bias_ids[row], r.bias[row] = o.bias_rows()
        r.logprobs[row] = -1 if o.logprobs is None else o.logprobs
        r.constrained[row] = allowed is not None
        if allowed is not None:
            r.allowed[row] = allowed


@functools.partial(jax.jit, donate_argnames=("state",))
def insert(state: SlotState, new: Admission) -> SlotState:
    """`state` with the admitted requests' rows written (JetStream's insert)."""
    a = jax.tree.map(jnp.asarray, new)
    rows = SlotState(tokens=a.prompts, prompt_len=a.prompt_len, last=jnp.zeros_like(a.prompt_len),
                     counts=jnp.zeros_like(a.prompt_len), max_tokens=a.max_tokens,
                     stop_ids=a.stop_ids,
                     sampling=SamplingParams.make(a.temperature, a.top_k, a.top_p),
                     keys=seed_keys(a.seeds, jnp.zeros_like(a.prompt_len)),  # as generate()'s row 0
                     rules=a.rules)
    return state.set_rows(a.slots, rows)


@functools.partial(jax.jit, donate_argnames=("state",))
def set_masks(state: SlotState, slots: jax.Array, allowed: jax.Array) -> SlotState:
    """`state` with the grammar masks of slots `slots` [R] set to `allowed` [R, W] (padding ids dropped)."""
    rules = state.rules
    return state.replace(rules=rules.replace(allowed=rules.allowed.at[slots].set(allowed, mode="drop")))
