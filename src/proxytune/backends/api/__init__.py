"""A base model behind an OpenAI-compatible ``/v1/completions`` endpoint (top-k log-probs only).

The endpoint is asked, per step, for the next token's top-k candidates (``logprobs: k``); the
decode loop (:mod:`proxytune.engine.blackbox`) completes them into a full row with a stated
missing-mass rule (:mod:`proxytune.backends.topk`). This module is what the user names and
what the loop holds: :class:`APISpec` (settings) and :class:`APIModel` (tokenizer, limits, the
client of :mod:`proxytune.backends.api.client`: requests, retries, candidates -> ids, the bill).

The prompt is sent as token ids (exact) or, where the endpoint refuses token prompts, as text
(the endpoint re-tokenizes it; see docs/black-box.md). ``chunk`` lets the endpoint draft
several tokens per call (:mod:`proxytune.backends.api.state`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ...errors import ConfigError, ModelLoadError
from ...prompts import Prompt, PromptFormat, as_messages, raw_text
from ..hf import resolve_source
from ..topk import MISSING_RULES
from .candidates import CandidateMapper
from .client import (
    APIUsage,
    EndpointClient,
    EndpointError,
    EndpointPrompt,
    Position,
    _completions_url,
)
from .state import APIBaseState, ChunkStats

__all__ = [
    "APIModel",
    "APISpec",
    "APIUsage",
    "CandidateMapper",
    "EndpointClient",
    "EndpointError",
    "EndpointPrompt",
    "Position",
    "_completions_url",
    "load_api_model",
    "load_api_tokenizer",
    "prompt_text",
]

DEFAULT_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class APISpec:
    """A base reached through an OpenAI-compatible completions endpoint.

    In a recipe: ``base: {url: http://host:8000/v1, model: NAME, top_logprobs: 20}``.
    """

    url: str
    """The API root, as for the ``openai`` client (``.../v1``; ``/v1`` is added to a bare
    ``http://host:port``)."""
    model: str
    """The model name the endpoint serves."""
    top_logprobs: int = DEFAULT_TOP_LOGPROBS
    """k: candidates asked for per token (OpenAI allows 5 on completions, vLLM 20 by default)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (sent as ``Authorization: Bearer``); unset:
    no key is sent."""
    tokenizer: str | None = None
    """A local copy of the endpoint model's tokenizer (path or hub id). Default: the first
    pair's tokenizer (the endpoint serves a model of the pair's family)."""
    prompt: PromptFormat = field(default_factory=PromptFormat)
    chunk: int | str = "auto"
    """Positions fetched per call: ``1`` is one call per token; ``N`` or ``"auto"`` lets the
    endpoint draft while the proxy agrees with it (same output, fewer calls)."""
    max_chunk: int = 16
    logprobs: str = "top"
    """``top``: the endpoint's top-k log-probs. ``sampled``: estimate them from ``samples``
    one-token completions per step (last resort, for endpoints without log-probs)."""
    samples: int = 32
    missing_mass: str = "uniform"
    """Rule for tokens outside the top-k: ``uniform``, ``floor`` or ``none``
    (:data:`~proxytune.backends.topk.MISSING_RULES`)."""
    expert_top: int | None = None
    """Each expert's own top tokens join the step's support (default: ``top_logprobs``)."""
    prompt_as: str = "auto"
    """``tokens`` (exact), ``text`` (the endpoint re-tokenizes), or ``auto`` (tokens, then
    text if the endpoint refuses token prompts)."""
    endpoint: str = "completions"
    """``completions`` (``/v1/completions``: token-id prompts, exact) or ``chat``
    (``/v1/chat/completions``: the prompt is the user message, the tokens so far an assistant
    message continued with vLLM's ``continue_final_message``; text only, one row per call,
    OpenAI caps ``top_logprobs`` at 20). Only for endpoints that continue the final message:
    others answer for a new turn, unseen. See docs/black-box.md."""
    extra_body: Mapping[str, Any] | None = None
    """Fields added to every request body, for what an engine needs beyond the OpenAI API
    (llama.cpp's server: ``logit_bias`` on its stop tokens, see docs/black-box.md)."""
    max_prompts: int | None = None
    """Prompts per call (``None``: every row that needs the endpoint in one call; llama.cpp's
    server takes 1)."""
    token_ids: bool | None = None
    """Ask for ``token_id:N`` candidates (``None``: ask, and stop if the endpoint refuses)."""
    timeout: float = 60.0
    max_retries: int = 4
    backoff: float = 0.5
    """First retry delay in seconds; doubles per retry (8 s at most); a server's
    ``Retry-After`` (up to 60 s) wins when longer."""
    context_length: int | None = None
    cost_ratio: float = 0.1
    """``chunk: auto``: cost of one drafted token relative to one call's fixed cost."""

    def __post_init__(self) -> None:
        for name in ("url", "model"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"an API base needs a non-empty {name!r}, got {value!r}")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"base url must start with http:// or https://, got {self.url!r}")
        _int(self.top_logprobs, "top_logprobs", 1)
        _int(self.max_chunk, "max_chunk", 1)
        _int(self.samples, "samples", 2)
        _int(self.max_retries, "max_retries", 0)
        if self.chunk != "auto":
            _int(self.chunk, "chunk", 1)
        if self.logprobs not in ("top", "sampled"):
            raise ConfigError(f"logprobs must be 'top' or 'sampled', got {self.logprobs!r}")

        if self.missing_mass not in MISSING_RULES:
            raise ConfigError(
                f"missing_mass must be one of {MISSING_RULES}, got {self.missing_mass!r}"
            )
        if self.endpoint not in ("completions", "chat"):
            raise ConfigError(f"endpoint must be completions or chat, got {self.endpoint!r}")
        if self.prompt_as not in ("auto", "tokens", "text"):
            raise ConfigError(f"prompt_as must be auto, tokens or text, got {self.prompt_as!r}")
        if self.expert_top is not None:
            _int(self.expert_top, "expert_top", 0)
        if self.extra_body is not None and not isinstance(self.extra_body, Mapping):
            raise ConfigError(f"extra_body must be a mapping of fields, got {self.extra_body!r}")
        if self.max_prompts is not None:
            _int(self.max_prompts, "max_prompts", 1)
        for name in ("timeout", "backoff", "cost_ratio"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        object.__setattr__(self, "prompt", PromptFormat.parse(self.prompt))

    @property
    def name(self) -> str:
        return f"{self.model} @ {self.url}"

    @property
    def load_key(self) -> tuple[Any, ...]:
        return ("api", self.url, self.model, self.tokenizer, repr(self.extra_body))

    @classmethod
    def parse(cls, spec: Mapping[str, Any] | APISpec, **defaults: Any) -> APISpec:
        """From a recipe mapping (``url``, ``model``/``path`` and options); ``defaults`` that
        only concern local models (device, dtype, ...) are ignored."""
        if isinstance(spec, APISpec):
            return spec
        data = dict(spec)
        if "path" in data and "model" not in data:
            data["model"] = data.pop("path")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown API base option(s) {unknown}; known: {sorted(known)}")
        if "model" not in data:
            raise ConfigError("an API base needs a 'model' (the name the endpoint serves)")
        return cls(**data)


def _int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


# the model the decode loop sees ---------------------------------------------------------------


class APIModel:
    """An endpoint as a member of a model set: tokenizer, limits and the client.

    It has no full logits: :meth:`start` refuses, and :class:`~proxytune.tuner.ProxyTuner`
    runs it in the black-box loop (:mod:`proxytune.engine.blackbox`).
    """

    top_k_only = True

    def __init__(
        self,
        spec: APISpec,
        tokenizer: Any,
        device: torch.device | str = "cpu",
        *,
        transport: Any = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.client = EndpointClient(
            spec, CandidateMapper(tokenizer, len(tokenizer)), transport=transport, sleep=sleep
        )

    def start_rows(
        self,
        prompt_ids: Sequence[Sequence[int]],
        fmt: PromptFormat,
        prompts: Sequence[Prompt],
        chunks: ChunkStats,
        usage: APIUsage,
    ) -> APIBaseState:
        """One generation's rows (:class:`~..base.TopKOnly`): the ids, and the text a text
        prompt path sends (each prompt rendered in ``fmt``)."""
        texts = [prompt_text(fmt, prompt, self.tokenizer) for prompt in prompts]
        return APIBaseState(self, prompt_ids, texts, chunks, usage)

    @property
    def usage(self) -> APIUsage:
        """Everything this model asked of the endpoint so far."""
        return self.client.usage

    @property
    def vocab_width(self) -> int:
        return len(self.tokenizer)

    @property
    def context_length(self) -> int | None:
        return self.spec.context_length

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return () if eos is None else (int(eos),)

    @property
    def prompt_path(self) -> str:
        """``tokens`` or ``text``: how prompts travel to the endpoint
        (:attr:`EndpointClient.prompt_path`)."""
        return self.client.prompt_path

    def probe(self) -> str:
        """Settle :attr:`prompt_path` now with a one-token call (logged); returns it."""
        text = "Hello"
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] or [0]
        return self.client.probe(EndpointPrompt(ids=list(ids), text=text))

    def start(self, prompts: Sequence[Sequence[int]], use_cache: bool = True) -> Any:
        raise ConfigError(
            f"the base {self.name} is an API that returns top-k log-probs, not full logits: "
            "it runs in ProxyTuner's black-box loop (generate/steps/stream); the logits "
            "processor, speculative decoding and the server need a local base"
        )


def prompt_text(fmt: PromptFormat, prompt: Prompt, tokenizer: Any) -> str:
    """The text :meth:`PromptFormat.render` would tokenize (what a text prompt sends)."""
    if fmt.kind == "chat":
        return tokenizer.apply_chat_template(
            as_messages(prompt, fmt.system), tokenize=False, add_generation_prompt=True
        )
    text = raw_text(prompt)
    if fmt.kind == "template":
        text = fmt.template.format(prompt=text)  # type: ignore[union-attr]
    if fmt.system:
        text = f"{fmt.system}\n\n{text}"
    return text


def load_api_tokenizer(spec: APISpec, fallback: Any) -> Any:
    """The tokenizer of the endpoint's model: ``spec.tokenizer`` if named, else ``fallback``."""
    if spec.tokenizer is None:
        if fallback is None:
            raise ConfigError(
                f"the API base {spec.name} needs a local copy of its model's tokenizer: name "
                "it (tokenizer: PATH, CLI --base-tokenizer) or give a pair to borrow it from"
            )
        return fallback
    from transformers import AutoTokenizer

    source, gguf = resolve_source(spec.tokenizer)
    try:
        kw = {"gguf_file": gguf} if gguf else {}
        return AutoTokenizer.from_pretrained(source, **kw)
    except Exception as err:
        raise ModelLoadError(f"could not load the tokenizer {spec.tokenizer!r}: {err}") from err


def load_api_model(
    spec: APISpec, local: Sequence[Any], cache: dict[tuple[Any, ...], Any]
) -> APIModel:
    """The model of an API base (one client per spec in ``cache``); it borrows the first local
    model's tokenizer unless ``spec.tokenizer`` is set, and lives on that model's device."""
    if spec.load_key not in cache:
        tokenizer = load_api_tokenizer(spec, local[0].tokenizer if local else None)
        device = local[0].device if local else torch.device("cpu")
        cache[spec.load_key] = APIModel(spec, tokenizer, device)
    return cache[spec.load_key]
