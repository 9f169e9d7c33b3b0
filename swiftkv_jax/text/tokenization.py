"""Text -> token ids: the one place that applies a tokenizer's chat template to a prompt.

The CLI, evaluation and the self-distillation data all encode prompts here, so a prompt is the
same ids everywhere: the template is rendered to text, then encoded without adding special
tokens again (the template already holds them), as transformers' own apply_chat_template does.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

Message = Mapping[str, str]  # {"role": "user" | "assistant" | "system", "content": text}


def render_chat(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool) -> str:
    """The chat template applied to `messages` as text ("" for no messages)."""
    if not messages:
        return ""
    return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                         add_generation_prompt=generation_prompt)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Ids of `text` with no special tokens added (for pieces of rendered templates)."""
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer: Any, text: str, chat: bool = True, system: str | None = None) -> list[int]:
    """Token ids of a user prompt: wrapped in the chat template (with an optional system message
    and the generation prompt) when `chat` and the tokenizer has one; else the plain text with
    the tokenizer's own special tokens (e.g. BOS)."""
    if chat and has_chat_template(tokenizer):
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": text}]
        return encode_text(tokenizer, render_chat(tokenizer, messages, generation_prompt=True))
    return list(tokenizer.encode(text))
