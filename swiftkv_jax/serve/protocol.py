"""The OpenAI API's request bodies and error body, and their translation to engine requests.

Field names and defaults follow OpenAI's API reference (temperature and top_p default to 1;
completions' max_tokens to 16), with vLLM's common extensions top_k, ignore_eos and
stop_token_ids. A value the engine cannot honour is an APIError (HTTP 400 with OpenAI's error
body) that says what to change, never silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict

from ..config import ModelConfig
from ..runtime.request import GenerateError, SamplingOptions

# SamplingOptions fields (GenerateError.param) whose OpenAI request field has another name
API_FIELDS = {"stop_ids": "stop_token_ids"}


def api_param(field: str | None) -> str | None:
    """The OpenAI request field an engine error names."""
    return API_FIELDS.get(field, field)


class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_exceeded", 500: "internal_error",
             503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The sampling fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        """APIError for what this server does not do (rather than ignoring it)."""
        if self.n != 1:
            raise APIError(400, f"n={self.n} is not supported: this server returns one choice per "
                           "prompt; send n separate requests (with different seeds)", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported; leave it out or send 0", name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported; leave it out", "logit_bias")

    def options(self, max_tokens: int, config: ModelConfig) -> SamplingOptions:
        """The engine's SamplingOptions for this body, checked by the engine's own rules
        (SamplingOptions.checked): a value it refuses is an APIError naming the OpenAI field."""
        extra = tuple(self.stop_token_ids or ())
        stop_ids = tuple(dict.fromkeys(extra + (() if self.ignore_eos else tuple(config.eos_token_ids))))
        top_k = 0 if self.top_k == -1 else (self.top_k or 0)  # vLLM: -1 is off
        options = SamplingOptions(max_tokens=max_tokens,
                                  temperature=1.0 if self.temperature is None else self.temperature,
                                  top_k=top_k, top_p=1.0 if self.top_p is None else self.top_p,
                                  seed=self.seed, stop_ids=stop_ids)
        try:
            return options.checked(config)
        except GenerateError as err:
            raise APIError(400, str(err), api_param(err.param)) from err


class CompletionRequest(_Sampling):
    """POST /v1/completions: the prompt as text, token ids, or a list of either (one choice each)."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for name, bad in (("echo", self.echo), ("logprobs", self.logprobs is not None),
                          ("best_of", (self.best_of or 1) != 1), ("suffix", self.suffix)):
            if bad:
                raise APIError(400, f"{name} is not supported by this server; leave it out", name)

    def prompts(self) -> list[Union[str, list[int]]]:
        """Each prompt of the request, text or ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise APIError(400, "prompt is empty: send text or a list of token ids", "prompt")
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        bad = [p.type for p in self.content if p.type != "text"]
        if bad:
            raise APIError(400, f"message content of type {bad[0]!r} is not supported: this model "
                           "reads text only", "messages")
        return "".join(p.text or "" for p in self.content)


def chat_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template takes them ("developer" is OpenAI's new "system")."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions: messages rendered with the tokenizer's chat template."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise APIError(400, "messages is empty: send at least one message", "messages")
        if self.logprobs or self.top_logprobs:
            raise APIError(400, "logprobs are not supported by this server; leave them out", "logprobs")
        if self.tools:
            raise APIError(400, "tools are not supported by this server; leave them out", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {\"type\": \"text\"} is supported",
                           "response_format")

    def chat(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them ("developer" is OpenAI's new "system")."""
        return chat_dicts(self.messages)


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's): a prompt, or chat messages rendered as /v1/chat/completions would."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True

    def check_supported(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "send exactly one of prompt (a string) and messages (a chat)", "prompt")

    def chat(self) -> list[dict[str, str]]:
        return chat_dicts(self.messages or [])


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's): token ids back to text."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]
