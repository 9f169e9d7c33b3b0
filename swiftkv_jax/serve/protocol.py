"""The OpenAI API's request bodies and error body, and their translation to engine requests.

Field names and defaults follow OpenAI's API reference (temperature and top_p default to 1;
completions' max_tokens to 16), with vLLM's common extensions top_k, min_tokens,
repetition_penalty, ignore_eos and stop_token_ids. A value the engine cannot honour is an
APIError (HTTP 400 with OpenAI's error body) that says what to change, never silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict

from ..config import ModelConfig
from ..runtime.request import GenerateError, SamplingOptions
from ..runtime.shapes import MAX_LOGPROBS
from ..text.grammar import GrammarError, choice_grammar, json_schema_grammar, regex_grammar

MAX_CHOICES = 16  # n (and best_of) per prompt: each choice is a request of its own in the engine

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
    repetition_penalty: float | None = None
    min_tokens: int = 0
    logit_bias: dict[str, float] | None = None
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:<id>"
    response_format: dict[str, Any] | None = None
    guided_json: Union[dict[str, Any], str, None] = None  # vLLM's structured-output fields
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    user: str | None = None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def choices(self) -> int:
        """How many candidates each prompt runs (n; completions' best_of may ask for more)."""
        return self.n

    def check_supported(self) -> None:
        """APIError for what this server does not do (rather than ignoring it)."""
        if not 1 <= self.n <= MAX_CHOICES:
            raise APIError(400, f"n must be in [1, {MAX_CHOICES}], got {self.n}", "n")

    def grammar(self) -> tuple[str, str] | None:
        """(the request field, its llguidance grammar) for the structured output this body asks
        for (OpenAI's response_format, or vLLM's guided_json / guided_regex / guided_choice),
        or None; APIError naming the field for one the grammar library refuses."""
        asked = [(name, getattr(self, name)) for name in ("guided_json", "guided_regex", "guided_choice")
                 if getattr(self, name) is not None]
        fmt = self.response_format or {}
        kind = fmt.get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise APIError(400, f"response_format type {kind!r} is not one of text, json_object, "
                                "json_schema", "response_format")
        if kind != "text":
            schema: Any = {"type": "object"}
            if kind == "json_schema":
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict) or "schema" not in spec:
                    raise APIError(400, "response_format json_schema needs {\"json_schema\": {\"name\": "
                                        "..., \"schema\": {...}}}", "response_format")
                schema = spec["schema"]
            asked.append(("response_format", schema))
        if len(asked) > 1:
            raise APIError(400, f"ask for one structured output, not {len(asked)}: "
                                f"{', '.join(n for n, _ in asked)}", asked[1][0])
        if not asked:
            return None
        name, value = asked[0]
        make = {"guided_regex": regex_grammar, "guided_choice": choice_grammar}.get(name, json_schema_grammar)
        try:
            return name, make(value)
        except (GrammarError, ValueError, TypeError) as err:
            raise APIError(400, f"{name}: {err}", name) from err

    def token_bias(self) -> dict[int, float]:
        """logit_bias with its keys (token ids sent as strings, as JSON needs) as ints."""
        try:
            return {int(t): float(b) for t, b in (self.logit_bias or {}).items()}
        except ValueError as err:
            raise APIError(400, "logit_bias keys must be token ids (e.g. {\"50256\": -100}); use "
                                "POST /tokenize to find a word's ids", "logit_bias") from err

    def options(self, max_tokens: int, config: ModelConfig, *, copy: int = 0, logprobs: int | None = None,
                prompt_logprobs: int | None = None) -> SamplingOptions:
        """The engine's SamplingOptions for this body (choice number `copy` of a prompt: its seed is
        seed + copy, so n seeded choices differ and repeat), checked by the engine's own rules
        (SamplingOptions.checked): a value it refuses is an APIError naming the OpenAI field."""
        extra = tuple(self.stop_token_ids or ())
        stop_ids = tuple(dict.fromkeys(extra + (() if self.ignore_eos else tuple(config.eos_token_ids))))
        top_k = 0 if self.top_k == -1 else (self.top_k or 0)  # vLLM: -1 is off
        seed = None if self.seed is None else (self.seed + copy) % (1 << 32)
        options = SamplingOptions(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_k=top_k, top_p=1.0 if self.top_p is None else self.top_p, seed=seed, stop_ids=stop_ids,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self.token_bias(), min_tokens=self.min_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs)
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

    def choices(self) -> int:
        return max(self.n, self.best_of or 1)

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server; leave it out", "suffix")
        if self.best_of is not None and not self.n <= self.best_of <= MAX_CHOICES:
            raise APIError(400, f"best_of must be in [n={self.n}, {MAX_CHOICES}], got {self.best_of}",
                           "best_of")
        if self.stream and self.choices() > self.n:
            raise APIError(400, "best_of > n cannot be streamed (the best are known only at the end); "
                                "send stream: false", "best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens 0 is only useful with echo: true (to score the prompt); "
                                "ask for at least 1 token", "max_tokens")

    def engine_logprobs(self) -> tuple[int | None, int | None]:
        """(logprobs, prompt_logprobs) to ask the engine for: the output tokens' when the client
        asks or best_of must rank candidates; the prompt's with echo (max_tokens 0 needs them)."""
        out = self.logprobs if self.logprobs is not None else (0 if self.choices() > self.n else None)
        prompt = self.logprobs if self.echo and self.logprobs is not None else None
        if self.max_tokens == 0 and prompt is None:
            prompt = 0
        return out, prompt

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

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise APIError(400, "messages is empty: send at least one message", "messages")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                               "top_logprobs")
        if self.tools:
            raise APIError(400, "tools are not supported by this server; leave them out", "tools")

    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

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
