"""The HTTP side of an API base: requests, retries, answers, the bill.

Candidates become ids through :class:`~.candidates.CandidateMapper`; a chat endpoint's
requests and answers go through :mod:`.chat`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError, ProxyTuneError
from ..base import APIUsage
from .candidates import CandidateMapper
from .chat import chat_body, legacy_choice

if TYPE_CHECKING:
    from . import APISpec

RETRY_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)
PATHS = {
    "tokens": "token ids, exact: the endpoint reads the loop's ids",
    "text": "the endpoint re-tokenizes them: exact only where that gives the loop's ids",
}
"""The two ways a row's prefix travels (:attr:`EndpointClient.prompt_path`)."""

log = logging.getLogger(__name__)


class EndpointError(ProxyTuneError):
    """The endpoint failed, refused the request, or answered without log-probabilities."""


# the client ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EndpointPrompt:
    """One row's prefix, both ways: token ids (sent when the endpoint takes token prompts)
    and text (sent otherwise)."""

    ids: Sequence[int]
    text: str
    reply: str = ""
    """The generated part of ``text`` (a chat endpoint gets it as the assistant message)."""


@dataclass
class Position:
    """One token position of an answer: the endpoint's token there and its candidates."""

    token: int | None
    """The id the endpoint chose (its draft), ``None`` if it maps to no id."""
    ids: list[int]
    logprobs: list[float]
    shown_mass: float
    """Sum of the probabilities of every returned candidate."""
    mapped_mass: float
    """... of those that mapped to an id."""


class EndpointClient:
    """POSTs to ``/completions`` (or ``/chat/completions``: :mod:`.chat`) with retries;
    parses candidates into :class:`Position` s."""

    def __init__(
        self,
        spec: APISpec,
        mapper: CandidateMapper,
        *,
        transport: Any = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        try:
            import httpx
        except ImportError as err:  # pragma: no cover - httpx ships with the server extra
            raise ConfigError(
                "an API base needs httpx: pip install httpx (or proxytune[server])"
            ) from err
        self.spec = spec
        self.mapper = mapper
        self.chat = spec.endpoint == "chat"
        self.url = _completions_url(spec.url, self.chat)
        self.usage = APIUsage()
        self.sleep = sleep
        self.prompt_as = "tokens" if spec.prompt_as == "auto" else spec.prompt_as
        if self.chat:
            self.prompt_as = "text"  # messages are text
        self.settled = spec.prompt_as != "auto" or self.chat
        """Whether :attr:`prompt_path` is known (set, or found out by a call)."""
        self.token_ids = True if spec.token_ids is None else spec.token_ids
        self.notes: list[str] = []
        """What auto-detection found out about the endpoint (for the report)."""
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._http = httpx.Client(headers=headers, timeout=spec.timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    @property
    def prompt_path(self) -> str:
        """``tokens`` or ``text``: how prefixes travel (:data:`PATHS`); on ``prompt_as: auto``
        ``tokens`` until the endpoint refuses a token prompt (:meth:`probe` asks at once)."""
        return self.prompt_as

    def describe(self) -> dict[str, Any]:
        """What a report or ``/health`` shows about the endpoint."""
        return {
            "url": self.url,
            "model": self.spec.model,
            "prompt_path": self.prompt_path if self.settled else "not yet probed",
            "token_id_candidates": self.token_ids,
            "max_prompts": self.spec.max_prompts,
            "notes": list(self.notes),
        }

    def probe(self, prompt: EndpointPrompt) -> str:
        """One one-token call that settles :attr:`prompt_path` (and whether candidates come
        back as ids); returns the path. Costs one call, added to :attr:`usage`."""
        if self.spec.logprobs == "sampled":
            self.samples([prompt], 2)
        else:
            self.positions([prompt], 1, 1)
        return self.prompt_path

    # requests ---------------------------------------------------------------------------------

    def positions(
        self,
        prompts: Sequence[EndpointPrompt],
        max_tokens: int,
        top: int,
        usage: APIUsage | None = None,
    ) -> list[list[Position]]:
        """Greedy continuation of each prompt, ``max_tokens`` long, with ``top`` candidates
        per position: one call for every prompt. What it costs is added to :attr:`usage` and
        to ``usage`` (one generation's bill)."""
        body: dict[str, Any] = {
            "model": self.spec.model,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "logprobs": top,
        }
        u = APIUsage()
        try:
            choices = self._complete(body, prompts, 1, u)
            return [self._parse_positions(c, u) for c in choices]
        finally:
            self._bill(u, usage)

    def samples(
        self, prompts: Sequence[EndpointPrompt], n: int, usage: APIUsage | None = None
    ) -> list[list[int | None]]:
        """``n`` sampled next tokens per prompt (temperature 1, no log-probs): one call."""
        body = {"model": self.spec.model, "max_tokens": 1, "temperature": 1.0, "n": n}
        u = APIUsage()
        try:
            choices = self._complete(body, prompts, n, u)
            out: list[list[int | None]] = [[] for _ in prompts]
            for i, c in enumerate(choices):
                text = c.get("text") or ""
                if not text and c.get("finish_reason") == "stop":
                    token = self._eos_id()
                else:
                    token = self.mapper.id_of(text)
                u.candidates += 1
                u.unmapped += token is None
                out[i // n].append(token)
            return out
        finally:
            self._bill(u, usage)

    def _bill(self, u: APIUsage, usage: APIUsage | None) -> None:
        self.usage.add(u)
        if usage is not None:
            usage.add(u)

    def _complete(
        self, body: dict[str, Any], prompts: Sequence[EndpointPrompt], n: int, u: APIUsage
    ) -> list[dict[str, Any]]:
        """Send ``body`` with the prompts as tokens or text (as the endpoint accepts), at most
        ``max_prompts`` per call; return the choices in prompt order (``n`` per prompt)."""
        size = 1 if self.chat else self.spec.max_prompts or len(prompts)
        out: list[dict[str, Any]] = []
        for start in range(0, len(prompts), size):
            out += self._complete_group(body, prompts[start : start + size], n, u)
        return out

    def _complete_group(
        self, body: dict[str, Any], prompts: Sequence[EndpointPrompt], n: int, u: APIUsage
    ) -> list[dict[str, Any]]:
        expect = len(prompts) * n
        while True:
            sent = {**(self.spec.extra_body or {}), **body}
            as_text = self.prompt_as == "text"
            if self.chat:
                top, first = sent.pop("logprobs", None), prompts[0]
                sent.update(chat_body(first.text, first.reply, top))
            else:
                sent["prompt"] = [p.text if as_text else list(p.ids) for p in prompts]
            if self.token_ids and "logprobs" in sent:
                sent["return_tokens_as_token_ids"] = True
            started = time.monotonic()
            try:
                data = self._post(sent, u)
            except _Refused as err:
                if self._adapt(err.message, as_text):
                    continue
                raise EndpointError(err.full) from None
            finally:
                u.seconds += time.monotonic() - started
            break
        self._settle()
        choices = data.get("choices")
        if not isinstance(choices, list) or len(choices) != expect:
            raise EndpointError(
                f"the endpoint {self.url} answered {len(choices or [])} choices for {expect} "
                "prompt(s); it must support a list of prompts on /completions (else set the "
                "base's max_prompts: 1, one call per prompt)"
            )
        choices = sorted(choices, key=lambda c: int(c.get("index", 0)))
        if self.chat:
            choices = [legacy_choice(c) for c in choices]
        usage = data.get("usage") or {}  # the endpoint's count; ours where it gives none
        if not as_text:
            self._check_ids(prompts, choices, n, usage.get("prompt_tokens"))
        u.calls += 1
        u.row_requests += len(prompts)
        u.prompt_tokens += int(usage.get("prompt_tokens") or sum(len(p.ids) for p in prompts))
        u.completion_tokens += int(usage.get("completion_tokens") or body["max_tokens"] * expect)
        return choices

    def _settle(self) -> None:
        """After the first answer: the path is known; say it once."""
        if not self.settled:
            self.settled = True
            path = self.prompt_as
            log.info("API base %s: prompts travel as %s (%s)", self.spec.name, path, PATHS[path])

    def _check_ids(
        self,
        prompts: Sequence[EndpointPrompt],
        choices: Sequence[dict[str, Any]],
        n: int,
        counted: Any,
    ) -> None:
        """Token prompts must be read verbatim: the ids an answer says it read
        (``prompt_token_ids``, vLLM) are the ids sent, and so is its prompt-token count."""
        for i, c in enumerate(choices):
            read = c.get("prompt_token_ids")
            sent = list(prompts[i // n].ids)
            if read is not None and list(read) != sent:
                raise self._not_verbatim(f"prompt {i // n} as {len(read)} other ids")
        sent_total = sum(len(p.ids) for p in prompts)
        if n == 1 and isinstance(counted, int) and counted != sent_total:
            raise self._not_verbatim(f"{counted} prompt tokens where {sent_total} ids were sent")

    def _not_verbatim(self, what: str) -> EndpointError:
        return EndpointError(
            f"the endpoint {self.url} read {what}: it does not take token-id prompts verbatim "
            "(it adds or drops tokens), so the base would score other prefixes than the loop's; "
            "set the base's prompt_as: text, or serve the model without a template/BOS"
        )

    def _adapt(self, message: str, as_text: bool) -> bool:
        """After a refusal: drop what the endpoint does not support and say whether to retry."""
        lower = message.lower()
        if "return_tokens_as_token_ids" in lower and self.token_ids and self.spec.token_ids is None:
            self.token_ids = False
            self.notes.append("the endpoint does not return token ids: candidates map by text")
            return True
        if not as_text and self.spec.prompt_as == "auto" and "prompt" in lower:
            self.prompt_as = "text"
            self.notes.append("the endpoint refuses token prompts: prompts are sent as text")
            log.warning("API base %s: %s", self.spec.name, self.notes[-1])
            return True
        return False

    def _post(self, body: dict[str, Any], u: APIUsage) -> dict[str, Any]:
        import httpx

        delay = self.spec.backoff
        asked = 0.0  # the server's Retry-After, if it gave one
        last = "no attempt made"
        for attempt in range(self.spec.max_retries + 1):
            if attempt:
                u.retries += 1
                self.sleep(max(min(delay, 8.0), min(asked, 60.0)))
                delay *= 2
            u.attempts += 1
            try:
                r = self._http.post(self.url, json=body)
            except httpx.TimeoutException:
                last = f"no answer within {self.spec.timeout} s"
                continue
            except httpx.TransportError as err:
                last = f"{type(err).__name__}: {err}"
                continue
            if r.status_code == 200:
                try:
                    return r.json()
                except ValueError:
                    last = "the answer is not JSON"
                    continue
            message = _error_message(r)
            if r.status_code in RETRY_STATUS and not _invalid_request(message):
                last = f"HTTP {r.status_code}: {message}"
                after = r.headers.get("retry-after", "")
                asked = float(after) if after.replace(".", "", 1).isdigit() else 0.0
                continue
            raise _Refused(
                message,
                f"the endpoint {self.url} refused the request (HTTP {r.status_code}): {message}",
            )
        raise EndpointError(
            f"the endpoint {self.url} failed {self.spec.max_retries + 1} time(s); last: {last}. "
            "Check that it is up (timeout and retries: the base's timeout/max_retries)"
        )

    # answers ----------------------------------------------------------------------------------

    def _parse_positions(self, choice: dict[str, Any], u: APIUsage) -> list[Position]:
        lp = choice.get("logprobs")
        tops = lp.get("top_logprobs") if isinstance(lp, dict) else None
        if not tops or not isinstance(tops, list) or tops[0] is None:
            raise EndpointError(
                f"the endpoint {self.url} returned no log-probabilities for model "
                f"{self.spec.model!r}; proxy-tuning needs its top-k (logprobs: k on "
                "/v1/completions). If it cannot give them, set the base's logprobs: sampled "
                "(CLI --base-samples N) to estimate them from N sampled tokens per step: a "
                "last resort that costs N tokens per step"
            )
        tokens = lp.get("tokens") or []
        chosen_lps = lp.get("token_logprobs") or []
        out = []
        for j, top in enumerate(tops):
            cands = dict(top or {})
            if j < len(tokens) and j < len(chosen_lps) and chosen_lps[j] is not None:
                cands.setdefault(tokens[j], chosen_lps[j])
            ids, lps = [], []
            shown = mapped = 0.0
            for token, value in cands.items():
                p = _exp(value)
                shown += p
                tid = self.mapper.id_of(str(token))
                u.candidates += 1
                if tid is None:
                    u.unmapped += 1
                    continue
                mapped += p
                ids.append(tid)
                lps.append(float(value))
            draft = self.mapper.id_of(str(tokens[j])) if j < len(tokens) else None
            out.append(Position(draft, ids, lps, shown, mapped))
        u.positions += len(out)
        return out

    def _eos_id(self) -> int | None:
        eos = getattr(self.mapper.tokenizer, "eos_token_id", None)
        return int(eos) if eos is not None else None


class _Refused(Exception):
    def __init__(self, message: str, full: str) -> None:
        super().__init__(full)
        self.message, self.full = message, full


def _exp(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    return math.exp(v) if v > -745 else 0.0


def _error_message(r: Any) -> str:
    try:
        err = r.json().get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except (ValueError, AttributeError):
        pass
    return (r.text or "").strip()[:300] or f"HTTP {r.status_code}"


def _invalid_request(message: str) -> bool:
    """A server error that is a refused request: llama-cpp-python's server answers a body
    that fails validation with HTTP 500 ``N validation error(s): ...``; retrying cannot help."""
    return "validation error" in message.lower()


def _completions_url(url: str, chat: bool = False) -> str:
    from urllib.parse import urlsplit

    root = url.rstrip("/")
    if urlsplit(root).path in ("", "/"):
        root += "/v1"
    return root + ("/chat/completions" if chat else "/completions")
