"""A conversation in the terminal, streamed, on the serving engine (`swiftkv-jax chat`).

Every turn sends the whole conversation through the chat template, as llama.cpp and ollama keep
their context: the engine's prefix cache finds the blocks the earlier turns wrote (their prompts
and answers), so a turn prefills only what is new. When the conversation outgrows the context,
the oldest exchanges are dropped (the system message stays). Commands: /reset, /stats, /quit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, TextIO

from ..runtime.engine import Engine
from ..runtime.handle import RequestHandle
from ..runtime.request import FinishReason, SamplingOptions
from ..text.detokenizer import IncrementalDetokenizer
from ..text.tokenization import Message, encode_text, render_chat

HELP = "/reset starts a new conversation, /stats shows speed and cache reuse, /quit (or Ctrl-D) leaves"


class ChatSession:
    """One conversation on `engine`: `reply(text, write)` streams the answer to `write` and keeps
    both turns. `options` are each answer's sampling settings (max_tokens is a cap: an answer
    also stops where the context ends)."""

    def __init__(self, engine: Engine, tokenizer: Any, options: SamplingOptions,
                 system: str | None = None):
        self.engine, self.tokenizer, self.options = engine, tokenizer, options
        self.system: list[Message] = [{"role": "system", "content": system}] if system else []
        self.messages: list[Message] = []
        self.dropped = 0  # exchanges dropped to fit the context
        self.last: RequestHandle | None = None

    def reset(self) -> None:
        """Forgets the conversation (its blocks stay in the prefix cache until evicted)."""
        self.messages, self.dropped, self.last = [], 0, None

    def _prompt(self, messages: list[Message]) -> list[int]:
        return encode_text(self.tokenizer, render_chat(self.tokenizer, self.system + messages,
                                                       generation_prompt=True))

    def _fitting(self, messages: list[Message]) -> tuple[list[Message], list[int]]:
        """`messages` less their oldest exchanges until the prompt leaves room for an answer."""
        room = min(self.options.max_tokens, self.engine.max_length // 4)
        ids = self._prompt(messages)
        while len(ids) + room > self.engine.max_length and len(messages) > 1:
            messages = messages[2:]
            self.dropped += 1
            ids = self._prompt(messages)
        if len(ids) + 1 > self.engine.max_length:
            raise ValueError(f"this message alone is {len(ids)} tokens, more than the context of "
                             f"{self.engine.max_length}; send a shorter one, or start the chat "
                             "with a larger --max-length")
        return messages, ids

    def reply(self, text: str, write: Callable[[str], None]) -> str:
        """Streams the answer to `text` to `write`, keeps both turns, returns the answer. Ctrl-C
        (KeyboardInterrupt) stops the answer; what was said so far is kept."""
        messages, ids = self._fitting(self.messages + [{"role": "user", "content": text}])
        options = dataclasses.replace(self.options, max_tokens=min(self.options.max_tokens,
                                                                   self.engine.max_length - len(ids)))
        handle = self.last = self.engine.submit(ids, options)
        pieces = IncrementalDetokenizer(self.tokenizer)
        try:
            for token in handle:
                write(pieces.add([token]))
        except KeyboardInterrupt:
            handle.cancel()
            handle.result()
        write(pieces.flush())
        if handle.finish_reason is FinishReason.ERROR:
            raise RuntimeError(f"the answer failed: {handle.error}")
        answer = self.tokenizer.decode(handle.tokens, skip_special_tokens=True).strip()
        self.messages = messages + [{"role": "assistant", "content": answer}]
        return answer

    def stats(self) -> str:
        """The last answer's figures and the engine's cache reuse, one line."""
        s = self.engine.stats()
        line = (f"prefix cache: {s['prefix_hit_rate']:.0%} of prompt tokens reused, "
                f"{s['blocks_in_use'] + s['blocks_cached']} of {s['blocks_total']} KV blocks held")
        h = self.last
        if h is None or h.ttft_s is None:
            return line
        decode = f", decode {1 / h.tpot_s:.1f} tokens/s" if h.tpot_s else ""
        return (f"last answer: {len(h.prompt)} prompt tokens ({h.cached_tokens} from the cache), "
                f"{len(h.tokens)} new, first token {h.ttft_s * 1e3:.0f} ms{decode}; {line}"
                + (f"; {self.dropped} oldest exchanges dropped to fit the context" if self.dropped else ""))


def run_chat(session: ChatSession, lines: Iterable[str], out: TextIO, prompt: str = "> ") -> None:
    """The read-answer loop over `lines` (stdin, or a test's list), answers written to `out`."""
    out.write(f"[{HELP}]\n{prompt}")
    out.flush()

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    for line in lines:
        text = line.strip()
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            session.reset()
            out.write("[new conversation]\n")
        elif text == "/stats":
            out.write(f"[{session.stats()}]\n")
        elif text.startswith("/"):
            out.write(f"[unknown command {text!r}; {HELP}]\n")
        elif text:
            try:
                session.reply(text, write)
                out.write("\n")
            except ValueError as err:
                out.write(f"[{err}]\n")
        out.write(prompt)
        out.flush()
    out.write("\n")
