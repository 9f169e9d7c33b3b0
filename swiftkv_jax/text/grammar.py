"""Structured output through llguidance: a JSON schema, a regular expression or a list of choices
becomes a grammar, and each request's matcher over it the engine's Constraint
(runtime/constraint.py): the tokens it allows next as a bitmask, advanced by each drawn token.

llguidance was picked over xgrammar and outlines-core: it installs without torch (39 MB), builds
its token trie for SmolLM2's 49k tokens in ~0.4 s once per tokenizer, and computes a JSON mask in
~1.5 ms per token (measured on the 2-core EPYC; docs/engine.md). JSON is generated compact (no
free whitespace), so a model cannot spin in newlines.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any, Sequence

import numpy as np

JSON_DEFAULTS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A schema, pattern or choice list the grammar library refuses; the message says why."""


def json_schema_grammar(schema: dict[str, Any] | str) -> str:
    """The grammar for JSON matching `schema` (a JSON Schema, as a dict or its text)."""
    from llguidance import LLMatcher

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as err:
            raise GrammarError(f"the JSON schema is not valid JSON: {err}") from err
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object, e.g. {\"type\": \"object\"}")
    return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)


def regex_grammar(pattern: str) -> str:
    """The grammar for text matching the regular expression `pattern` (whole)."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_regex(pattern)


def choice_grammar(choices: Sequence[str]) -> str:
    """The grammar for exactly one of `choices` (vLLM's guided_choice)."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("choices must be a non-empty list of non-empty strings")
    return regex_grammar("(" + "|".join(re.escape(c) for c in choices) + ")")


class Grammars:
    """Grammar constraints for one tokenizer and vocabulary size; its llguidance tokenizer is
    built on first use and shared by every request (thread-safe)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]):
        self._tokenizer, self.vocab_size, self._eos = tokenizer, vocab_size, list(eos_token_ids)
        self._lltok: Any = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._lltok is None:
                from llguidance.hf import from_tokenizer
                self._lltok = from_tokenizer(self._tokenizer, n_vocab=self.vocab_size,
                                             eos_token=self._eos or None)
            return self._lltok

    def constraint(self, grammar: str) -> "GrammarConstraint":
        """A fresh matcher over `grammar`, or GrammarError saying what the library refused."""
        from llguidance import LLMatcher

        tokenizer = self._ll_tokenizer()
        error = LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise GrammarError(error.strip())
        from llguidance.numpy import get_bitmask_shape

        matcher = LLMatcher(tokenizer, grammar)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return GrammarConstraint(matcher, get_bitmask_shape(1, self.vocab_size)[1])


class GrammarConstraint:
    """One request's llguidance matcher as the engine's Constraint."""

    def __init__(self, matcher: Any, words: int):
        self._matcher, self._words = matcher, words

    def allowed(self) -> np.ndarray:
        from llguidance.numpy import fill_next_token_bitmask

        mask = np.zeros((1, self._words), np.int32)
        fill_next_token_bitmask(self._matcher, mask, 0)
        return mask[0]

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            raise RuntimeError(f"the grammar refused token {token}: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        return bool(self._matcher.is_stopped())
