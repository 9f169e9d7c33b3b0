"""Token ids -> text as they stream: incremental detokenisation and stop strings.

A byte-level BPE token can hold part of a UTF-8 character, so decoding one token at a time
would print replacement characters. IncrementalDetokenizer decodes a short window of recent
tokens (as vLLM and TGI do) and releases text only once it no longer ends in an incomplete
character. StopStrings holds back the tail that could still become a stop string, so a stop
string split across tokens is never half-sent.
"""

from __future__ import annotations

from typing import Any, Sequence

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to


class IncrementalDetokenizer:
    """Feeds generated token ids, returns the new text each time; the pieces join to
    `tokenizer.decode(all_ids, skip_special_tokens=True)` for the tokenizers we serve."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        # Text is decoded from ids[_prefix:]: a window that starts one release back, so a
        # decoder that treats a sequence's first token specially (SentencePiece's leading space)
        # does so in both decodes and their difference is exactly the new text.
        self._prefix = self._read = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)

    def add(self, token_ids: Sequence[int]) -> str:
        """The text that `token_ids` (appended to those so far) complete; "" while a character
        is still incomplete."""
        self._ids.extend(int(t) for t in token_ids)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]

    def flush(self) -> str:
        """Whatever is left when the output ends (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return after[len(before):] if len(after) > len(before) else ""


class StopStrings:
    """Cuts streamed text at the first stop string; `push` returns what is safe to send now."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.hit = False

    def push(self, text: str, armed: bool = True) -> str:
        """Text to send; once a stop string is seen, the text before it and `hit` is True.
        Text pushed while not `armed` (before min_tokens) is sent as it is, never cut."""
        if self.hit:
            return ""
        self._pending += text
        if not armed:
            out, self._pending = self._pending, ""
            return out
        cut = min((i for i in (self._pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self._pending = self._pending[:cut], ""
            return out
        keep = min(self._hold, len(self._pending))
        out = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(out):]
        return out

    def flush(self) -> str:
        """The held-back tail, once the output has ended without a stop string."""
        out, self._pending = ("" if self.hit else self._pending), ""
        return out
