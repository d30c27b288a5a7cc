"""The OpenAI wire format: request models (validated strictly) and response models.

Requests follow the OpenAI API. Unknown fields are ignored and named in a logged warning, as
vLLM does (lm-eval and other clients forward settings verbatim); fields the server cannot honour
(tools, ``logit_bias``, ``suffix``...) are refused when set, and harmless hints (``store``,
``metadata``, ``service_tier``...) are accepted and ignored. ``/v1/completions`` takes text or
token-id prompts and ``echo`` (:mod:`.echo`).
Proxy-tuning controls are extra body fields: ``alpha``, ``active_pairs``, ``rule`` (and the
vLLM-style ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``,
``return_tokens_as_token_ids``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import fields as dataclass_fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import GenerationConfig
from ..errors import ConfigError
from ..jsontext import lone_surrogate

log = logging.getLogger("proxytune.server")


class APIError(Exception):
    """An error answered as an OpenAI error body: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return {
            401: "authentication_error",
            404: "invalid_request_error",
            429: "rate_limit_error",
            500: "server_error",
            503: "server_error",
        }.get(self.status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _refused(param: str, problem: str) -> ConfigError:
    """A validator's refusal of the request field ``param`` (the 400 names it)."""
    return ConfigError(f"{param}: {problem}", param=param)


class _Strict(BaseModel):
    """Strict types; fields it does not know are ignored and named in a logged warning (as
    vLLM's ``OpenAIBaseModel`` does)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _note_unknown(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                names = ", ".join(repr(k) for k in unknown)
                log.warning("%s: ignored unknown field(s) %s", cls.__name__, names)
        return data


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's; nothing to obfuscate here


class _Common(_Strict):
    """Fields shared by both endpoints."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # proxy-tuning controls (extra body fields)
    alpha: Any = None
    """One number (every pair), a list with one per pair, or a schedule mapping."""
    active_pairs: list[int] | None = None
    """Indices of the pairs to run; ``[]`` runs the base alone."""
    rule: Any = None
    """A steering rule for this request: a name or ``{"name": ..., **settings}``."""
    fallback: Literal["fail", "base", "expert"] | None = None
    """When a pair fails mid-request (default: the server's ``--fallback``)."""
    # vLLM-style extras
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    return_tokens_as_token_ids: bool = False

    @model_validator(mode="after")
    def _check_common(self) -> _Common:
        if self.stream_options is not None and not self.stream:
            raise _refused("stream_options", "only allowed when stream is true")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(not s for s in stops):
            raise _refused("stop", "stop strings must be non-empty")
        if self.logit_bias:
            raise _refused("logit_bias", "not supported by this server")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def generation(self, max_new_tokens: int | None, top: int | None) -> dict[str, Any]:
        """The :class:`~proxytune.config.GenerationConfig` settings this request asks for
        (``None``: the server's default); ``top``: the log-prob alternatives, ``None`` for
        none (the endpoints spell it differently)."""
        same = {name: getattr(self, name) for name in _SAME_AS_CONFIG}
        return same | {
            "max_new_tokens": max_new_tokens,
            "stop": self.stops or None,
            "logprobs": top is not None,
            "top_logprobs": top or 0,
            "ignore_eos": self.ignore_eos or None,
        }


_SAME_AS_CONFIG = tuple(
    f.name
    for f in dataclass_fields(GenerationConfig)
    if f.name in _Common.model_fields and f.name not in ("stop", "ignore_eos")
)
"""Sampling settings a request spells as the engine does (temperature, top_p, seed, n...)."""


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    """Text, texts, token ids, or a list of token-id lists (a batch, as OpenAI takes)."""
    max_tokens: int | None = Field(None, ge=0)
    """0 only with ``echo``: the prompt's log-probs, nothing generated."""
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.echo and self.stream:
            raise _refused(
                "echo",
                "not supported with stream: true; send stream: false (the prompt's "
                "log-probs come in the one response)",
            )
        if self.max_tokens == 0 and not self.echo:
            raise _refused(
                "max_tokens",
                "must be >= 1; 0 is allowed only with echo: true (the prompt's log-probs alone)",
            )
        if self.suffix:
            raise _refused("suffix", "not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise _refused("best_of", "only best_of == n is supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise _refused("prompt", "give at least one prompt")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


# OpenAI chat fields that are hints this server can ignore, and features it cannot serve
IGNORED_CHAT_FIELDS = (
    "store",
    "metadata",
    "service_tier",
    "parallel_tool_calls",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "safety_identifier",
    "verbosity",
)
UNSUPPORTED_CHAT_FIELDS = (
    "tools",
    "functions",
    "function_call",
    "audio",
    "prediction",
    "web_search_options",
    "reasoning_effort",
    "moderation",
)


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    response_format: dict[str, Any] | None = None
    tool_choice: Any = None
    modalities: list[str] | None = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None
    prompt_cache_key: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    safety_identifier: Any = None
    verbosity: Any = None
    tools: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    moderation: Any = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        for name in UNSUPPORTED_CHAT_FIELDS:
            if getattr(self, name) not in (None, [], {}):
                raise _refused(name, "not supported by this server")
        if self.tool_choice not in (None, "none"):
            raise _refused("tool_choice", "not supported by this server (only 'none')")
        if self.response_format not in (None, {"type": "text"}):
            raise _refused("response_format", "only {'type': 'text'} is supported")
        if self.modalities not in (None, ["text"]):
            raise _refused("modalities", "only ['text'] is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise _refused("top_logprobs", "requires logprobs to be true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        """The messages as the engine takes them (``developer`` is the newer ``system``)."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


# responses ------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy format: parallel lists. With ``echo`` the prompt's tokens come first; its
    first token has no log-prob (``None`` in ``token_logprobs`` and ``top_logprobs``)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "proxytune"
    max_model_len: int | None = None
    pairs: int = 0
    """Expert/anti-expert pairs; ``alpha`` and ``active_pairs`` index them."""
    default_alpha: list[Any] = Field(default_factory=list)
    rule: str | None = None
    """The server's default steering rule (requests may pick another with ``rule``)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# parsing ------------------------------------------------------------------------------------


def parse_request(raw: bytes, model: type[BaseModel]) -> Any:
    """JSON body -> request model, or an :class:`APIError` naming the field."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise APIError("the request body is not valid JSON: it is nested too deeply") from None
    except ValueError as err:  # bad JSON, bad UTF-8, an integer of more than 4300 digits
        raise APIError(f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise APIError("the request body must be a JSON object")
    where = lone_surrogate(data)
    if where is not None:
        raise APIError(
            f"{where}: holds a lone surrogate escape (\\ud800-\\udfff), which is not text; "
            "send valid UTF-16 pairs or UTF-8",
            param=where,
        )
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


_NESTED = {"role", "content", "name", "include_usage", "type", "text"}


def validation_error(err: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field (``messages[0].role``)."""
    first = err.errors()[0]
    loc = list(first["loc"])
    message = str(first["msg"])
    if first["type"] == "value_error":  # our validators: a ConfigError naming its field
        error = first.get("ctx", {}).get("error")
        param = error.param if isinstance(error, ConfigError) else None
        return APIError(message.removeprefix("Value error, "), param=param)
    param = str(loc[0]) if loc else None
    for part in loc[1:]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in _NESTED:
            param += f".{part}"
        else:
            break
    if first["type"] == "missing":
        return APIError(f"{param}: this field is required", param=param)
    if first["type"] == "extra_forbidden":
        return APIError(f"{param}: unrecognized request argument", param=param)
    if param == "prompt":
        message = PROMPT_SHAPES
        value = first.get("input")
        if isinstance(value, list) and any(isinstance(v, dict) for v in value):
            message += "; a chat (a list of messages) goes to /v1/chat/completions as messages"
    return APIError(f"{param}: {message}", param=param)


PROMPT_SHAPES = (
    "must be a string, a list of strings, a list of token ids (integers) or a list of such lists"
)
