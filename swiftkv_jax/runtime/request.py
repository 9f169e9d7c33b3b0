"""What a request asks for, checked before anything runs: its prompt and its sampling options,
whether it fits, and why a request ended.

generate(), the engine and the server all validate through here, so a bad request gets the same
clear message from each, before it touches the cache or another request. Every GenerateError
names the offending field (`param`), which the server reports as OpenAI's error `param`.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from typing import Mapping, Sequence

import numpy as np

from ..config import ModelConfig
from .shapes import MAX_LOGIT_BIAS, MAX_LOGPROBS, NO_TOKEN

MAX_STOP_IDS = 8  # stop ids are padded to this many so their number never recompiles


class GenerateError(ValueError):
    """A request that cannot run as given; the message says what to change and `param` names the
    request field at fault (a SamplingOptions field or "prompt"; None when it is no one field)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class FinishReason(str, enum.Enum):
    """Why a request ended."""

    STOP = "stop"            # it produced a stop id (not output)
    LENGTH = "length"        # it produced max_tokens tokens
    CANCELLED = "cancelled"  # its caller cancelled it
    ERROR = "error"          # the engine failed while running it (see handle.error)


def check_prompt(row: Sequence[int], vocab: int, name: str = "prompt") -> list[int]:
    """The prompt as a list of ints, or a GenerateError saying what is wrong with it."""
    if isinstance(row, (str, bytes)):
        raise GenerateError(f"{name} must be token ids (a list of ints); tokenize text first, "
                            "e.g. tokenizer.encode(text)", "prompt")
    row = list(np.asarray(row).tolist()) if isinstance(row, np.ndarray) else list(row)
    if len(row) == 0:
        raise GenerateError(f"{name} is empty: every prompt needs at least one token id", "prompt")
    if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in row):
        raise GenerateError(f"{name} holds something other than integer token ids", "prompt")
    bad = [t for t in row if not 0 <= t < vocab]
    if bad:
        raise GenerateError(f"{name} has token ids outside the vocabulary [0, {vocab}): "
                            f"{bad[:5]}; was it tokenized for another model?", "prompt")
    return [int(t) for t in row]


def check_room(prompt_tokens: int, max_tokens: int, capacity: int, *, name: str = "the prompt",
               budget: str = "max_tokens", holder: str = "this engine holds {} per request",
               fix: str = "") -> None:
    """GenerateError (param max_tokens) when a prompt and its token budget need more positions
    than the `capacity` a request may hold; `holder` and `fix` word it for the caller's API."""
    need = prompt_tokens + max_tokens
    if need > capacity:
        raise GenerateError(f"{name} has {prompt_tokens} tokens; with {budget}={max_tokens} it needs "
                            f"{need} positions but {holder.format(capacity)}; {fix}", "max_tokens")


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (its raw logits' log_softmax) and, when asked
    for, the most likely tokens at its position: (token id, log-probability), most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How one request decodes. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters
    off; seed None draws a fresh one; stop_ids None means the model's eos ids (an empty tuple: none,
    as vLLM's ignore_eos). A stop id ends the request and is not output.

    Logit rules (logits.py; OpenAI's and vLLM's meanings): presence_penalty / frequency_penalty in
    [-2, 2] on the tokens produced so far; repetition_penalty > 0 (1 = off) on prompt and output
    tokens; logit_bias {token id: bias in [-100, 100]}; min_tokens: no stop id before that many.
    logprobs: the drawn tokens' log-probabilities and that many alternatives (0..20; None = off);
    prompt_logprobs: the same for the prompt's tokens (every token after the first), with which
    max_tokens may be 0 (score the prompt only)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | None = None
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def checked(self, config: ModelConfig) -> "SamplingOptions":
        """These options with the seed and stop ids filled in, or a GenerateError."""
        scoring = self.prompt_logprobs is not None
        if int(self.max_tokens) < (0 if scoring else 1):
            raise GenerateError(f"max_tokens must be >= 1 (0 only with prompt_logprobs), got "
                                f"{self.max_tokens}", "max_tokens")
        if not self.temperature >= 0:
            raise GenerateError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}",
                                "temperature")
        if int(self.top_k) < 0:
            raise GenerateError(f"top_k must be >= 0 (0 = off), got {self.top_k}", "top_k")
        if not 0 < self.top_p <= 1:
            raise GenerateError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}", "top_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise GenerateError(f"{name} must be in [-2, 2] (0 = off), got {getattr(self, name)}", name)
        if not 0 < self.repetition_penalty <= 100:
            raise GenerateError(f"repetition_penalty must be > 0 (1 = off; > 1 discourages "
                                f"repeats), got {self.repetition_penalty}", "repetition_penalty")
        if not 0 <= int(self.min_tokens) <= max(int(self.max_tokens), 0):
            raise GenerateError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got "
                                f"{self.min_tokens}", "min_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= int(value) <= MAX_LOGPROBS:
                raise GenerateError(f"{name} must be in [0, {MAX_LOGPROBS}] (alternatives per token) "
                                    f"or None, got {value}", name)
        bias = {int(t): float(b) for t, b in (self.logit_bias or {}).items()}
        if len(bias) > MAX_LOGIT_BIAS:
            raise GenerateError(f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS} are "
                                "supported", "logit_bias")
        bad = [t for t in bias if not 0 <= t < config.vocab_size]
        if bad:
            raise GenerateError(f"logit_bias names token id {bad[0]}, outside the vocabulary "
                                f"[0, {config.vocab_size})", "logit_bias")
        wild = [b for b in bias.values() if not -100 <= b <= 100]
        if wild:
            raise GenerateError(f"logit_bias values must be in [-100, 100], got {wild[0]}", "logit_bias")
        stop = tuple(int(t) for t in (config.eos_token_ids if self.stop_ids is None else self.stop_ids))
        if len(stop) > MAX_STOP_IDS:
            raise GenerateError(f"at most {MAX_STOP_IDS} stop ids (the model's eos ids included "
                                f"unless they are switched off) are supported, got {len(stop)}",
                                "stop_ids")
        if self.seed is not None and not 0 <= int(self.seed) < 2 ** 32:
            raise GenerateError(f"seed must be in [0, 2**32), got {self.seed}", "seed")
        seed = int.from_bytes(os.urandom(4), "little") if self.seed is None else int(self.seed)
        return dataclasses.replace(self, max_tokens=int(self.max_tokens), top_k=int(self.top_k),
                                   temperature=float(self.temperature), top_p=float(self.top_p),
                                   seed=seed, stop_ids=stop, logit_bias=bias, min_tokens=int(self.min_tokens))

    def bias_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """logit_bias as [MAX_LOGIT_BIAS] ids (NO_TOKEN padded) and biases (after checked())."""
        ids = np.full((MAX_LOGIT_BIAS,), NO_TOKEN, np.int32)
        values = np.zeros((MAX_LOGIT_BIAS,), np.float32)
        ids[:len(self.logit_bias)] = list(self.logit_bias)
        values[:len(self.logit_bias)] = list(self.logit_bias.values())
        return ids, values

    def stop_row(self) -> np.ndarray:
        """[MAX_STOP_IDS] int32 stop ids, -1 padded (after checked())."""
        row = np.full((MAX_STOP_IDS,), -1, np.int32)
        row[:len(self.stop_ids)] = self.stop_ids
        return row

    def first_token_finish(self, token: int) -> FinishReason | None:
        """How a request ends at its first token (sampled from the prompt's last logits, on the
        host): a stop id ends it (not output), a budget of one token ends it after the token."""
        if token in self.stop_ids:
            return FinishReason.STOP
        return FinishReason.LENGTH if self.max_tokens == 1 else None
