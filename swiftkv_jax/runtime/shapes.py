"""The few shapes the jitted steps take, and the engine's default geometry.

Every padded size is a power of two from here, so a new prompt length or request mix reuses a
compiled program instead of compiling a new one. Pure Python: the scheduler plans with it, and the
command line reads the defaults, without importing JAX.
"""

from __future__ import annotations

DEFAULT_CHUNK_SIZE = 256  # prompt tokens per prefill step: long prompts pad at most one chunk
MIN_CHUNK = 16  # the smallest chunk bucket (and the smallest auto-sized cache)
DEFAULT_MAX_SLOTS = 8  # requests an engine decodes together (cache rows)
DEFAULT_MAX_LENGTH = 2048  # prompt + output tokens one engine request may hold
DEFAULT_DECODE_STEPS = 8  # decode tokens per engine step while no prompt is being prefilled
DEFAULT_GRAMMAR_DECODE_STEPS = 1  # the same while a grammar-constrained request runs (measured: engine.md)
MAX_LOGPROBS = 20  # top alternatives a request may ask for per token (OpenAI's limit)
MAX_LOGIT_BIAS = 300  # logit_bias entries per request (OpenAI's limit), padded to this many
NO_TOKEN = 2 ** 30  # padding id in a row's logit_bias ids: out of every vocabulary (its scatter is dropped)


def pow2_at_least(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def chunk_bucket(tokens: int, chunk_size: int) -> int:
    """The padded length of a chunk of `tokens` prompt tokens: the next power of two >= MIN_CHUNK,
    capped at `chunk_size` (so a prompt's padding is less than one chunk)."""
    return min(max(MIN_CHUNK, pow2_at_least(tokens)), chunk_size)


def chunk_widths(chunk_size: int) -> list[int]:
    """Every width chunk_bucket gives for this chunk size: MIN_CHUNK, 2 * MIN_CHUNK, ..., chunk_size."""
    widths = [MIN_CHUNK]
    while widths[-1] < chunk_size:
        widths.append(min(widths[-1] * 2, chunk_size))
    return widths


def row_bucket(rows: int, max_rows: int) -> int:
    """The padded number of rows of a step: a power of two, at most `max_rows`."""
    return min(pow2_at_least(rows), max_rows)


def row_buckets(max_rows: int) -> list[int]:
    """Every row count row_bucket gives up to `max_rows`: 1, 2, 4, ..., max_rows."""
    return sorted({row_bucket(1 << i, max_rows) for i in range(max_rows.bit_length() + 1)})


def length_bucket(tokens: int) -> int:
    """A cache length for `tokens` positions, rounded up to a power of two (at least MIN_CHUNK), so
    other lengths in the same bucket reuse the compiled steps."""
    return max(MIN_CHUNK, pow2_at_least(tokens))
