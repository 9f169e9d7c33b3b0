"""Log-probabilities in OpenAI's two response shapes.

Completions (the legacy shape lm-evaluation-harness reads): `{"tokens", "token_logprobs",
"top_logprobs", "text_offset"}`, parallel lists, a prompt's first token with null logprob and
null alternatives (echo). Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs":
[{"token", "logprob", "bytes"}]}]}`. A token's text is the tokenizer's decode of that token alone
(as vLLM's); the values are the model's own distribution (runtime/logits.py).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..runtime.request import TokenLogprob


class TokenTexts:
    """Token id -> its text, decoded once per id (a server decodes the same ids again and again)."""

    def __init__(self, tokenizer: Any):
        self._tokenizer, self._texts = tokenizer, {}

    @staticmethod
    def as_ids(token: int) -> str:
        """vLLM's return_tokens_as_token_ids naming: exact even where tokens decode alike."""
        return f"token_id:{token}"

    def __call__(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self._tokenizer.decode([token], clean_up_tokenization_spaces=False)
        return text


class CompletionLogprobs:
    """One completion choice's `logprobs` object, built as its tokens arrive (`add`)."""

    def __init__(self, texts: Callable[[int], str], offset: int = 0):
        self._texts, self._offset = texts, offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, ids: Sequence[int], logprobs: Sequence[TokenLogprob | None]) -> dict[str, list]:
        """Appends tokens and their logprobs (None: a prompt's first token); returns the object
        for just these (a streamed chunk's)."""
        start = len(self.tokens)
        for token, lp in zip(ids, logprobs):
            text = self._texts(token)
            self.tokens.append(text)
            self.text_offset.append(self._offset)
            self._offset += len(text)
            self.token_logprobs.append(None if lp is None else lp.logprob)
            self.top_logprobs.append(None if lp is None else {self._texts(t): v for t, v in lp.top})
        return self.body(start)

    def body(self, start: int = 0) -> dict[str, list]:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}


def chat_logprobs(texts: Callable[[int], str], ids: Sequence[int],
                  logprobs: Sequence[TokenLogprob]) -> list[dict]:
    """The chat shape's `content` list for these tokens."""
    def entry(token: int, value: float) -> dict[str, Any]:
        text = texts(token)
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    return [{**entry(t, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
            for t, lp in zip(ids, logprobs)]
