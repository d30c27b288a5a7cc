"""Engine output -> OpenAI responses: choices, log-probs, usage; streamed as server-sent events
or collected whole (cancelling the work when the client goes away)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..engine.requests import Job
from ..results import StepUpdate, TokenLogprob
from .echo import joined
from .metrics import Metrics
from .protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    TopLogprob,
    Usage,
)
from .scheduler import Finished, Scheduler, ShuttingDown
from .tokens import TokenText

if TYPE_CHECKING:
    from .echo import Echo

FLOOR = -9999.0
"""What OpenAI reports for an impossible token (JSON has no -Infinity)."""


def _lp(value: float) -> float:
    return max(float(value), FLOOR)


class Renderer:
    """Formats tokens and log-probs for one tokenizer (shared by every request)."""

    def __init__(self, tokenizer: Any, model_name: str) -> None:
        self.tokens = TokenText(tokenizer)
        self.model_name = model_name

    def completion_logprobs(
        self, records: list[TokenLogprob], offset: int, as_ids: bool
    ) -> tuple[CompletionLogprobs, int]:
        """The legacy format: parallel lists; ``top_logprobs`` holds the alternatives and the
        chosen token. Two ids may show as the same text (two halves of characters): its entry
        holds the larger log-prob, so the dict's maximum is the most likely token's (lm-eval
        tests greediness with it). Returns the offset after these tokens too."""
        out = CompletionLogprobs()
        for r in records:
            token = self.tokens.text(r.token_id, as_ids)
            out.tokens.append(token)
            out.token_logprobs.append(_lp(r.logprob))
            shown = [(self.tokens.text(i, as_ids), lp) for i, _, lp in r.top]
            top: dict[str, float] = {}
            for text, lp in [*shown, (token, r.logprob)]:
                top[text] = max(top.get(text, FLOOR), _lp(lp))
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(self.tokens.text(r.token_id))
        return out, offset

    def chat_logprobs(self, records: list[TokenLogprob], as_ids: bool) -> ChatLogprobs:
        t = self.tokens
        return ChatLogprobs(
            content=[
                ChatTokenLogprob(
                    token=t.text(r.token_id, as_ids),
                    logprob=_lp(r.logprob),
                    bytes=t.bytes(r.token_id),
                    top_logprobs=[
                        TopLogprob(token=t.text(i, as_ids), logprob=_lp(lp), bytes=t.bytes(i))
                        for i, _, lp in r.top
                    ],
                )
                for r in records
            ]
        )


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    offset: int = 0
    finish_reason: str | None = None


class Accumulator:
    """One request's answer as it arrives: streamed chunks, or the whole response at the end."""

    def __init__(self, job: Job, renderer: Renderer, chat: bool, req: Any, request_id: str):
        self.job, self.renderer, self.chat, self.req, self.id = job, renderer, chat, req, request_id
        self.created = int(time.time())
        self.choices = [_Choice() for _ in range(job.n_rows)]
        self.as_ids = bool(req.return_tokens_as_token_ids)
        self.first_token_at: float | None = None
        self.finished = False
        self.echo: list[Echo] | None = None
        """With ``echo``: per prompt, what comes before each of its choices."""

    @property
    def usage(self) -> Usage:
        prompt = sum(self.job.prompt_tokens)
        completion = sum(c.tokens for c in self.choices)
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    def add(self, updates: list[StepUpdate]) -> None:
        for u in updates:
            c = self.choices[u.row]
            c.text.append(u.delta)
            c.tokens += 1
            if u.logprob is not None:
                c.logprobs.append(u.logprob)
            if u.finish_reason is not None:
                c.finish_reason = u.finish_reason

    @property
    def extra(self) -> dict[str, Any] | None:
        """The ``proxytune`` field of the answer: set when the request fell back."""
        fell = self.job.fell_back
        return None if fell is None else fell.as_dict()

    # non-streaming --------------------------------------------------------------------------

    def body(self) -> dict[str, Any]:
        """The whole answer as JSON, with a ``proxytune`` field where the request fell back."""
        out = self.response().model_dump()
        if self.extra is not None:
            out["proxytune"] = self.extra
        return out

    def response(self) -> Completion | ChatCompletion:
        r = self.renderer
        if self.chat:
            return ChatCompletion(
                id=self.id,
                created=self.created,
                model=r.model_name,
                usage=self.usage,
                choices=[
                    ChatChoice(
                        index=i,
                        message=AssistantMessage(content="".join(c.text)),
                        logprobs=r.chat_logprobs(c.logprobs, self.as_ids)
                        if self.job.config.logprobs
                        else None,
                        finish_reason=c.finish_reason,
                    )
                    for i, c in enumerate(self.choices)
                ],
            )
        return Completion(
            id=self.id,
            created=self.created,
            model=r.model_name,
            usage=self.usage,
            choices=[self._completion_choice(i, c) for i, c in enumerate(self.choices)],
        )

    def _completion_choice(self, i: int, c: _Choice) -> CompletionChoice:
        """Choice ``i``: its text and log-probs, after its prompt's with ``echo``."""
        head = self.echo[i // self.job.config.n] if self.echo else None
        start = len(head.text) if head else 0
        logprobs = None
        if self.job.config.logprobs:
            logprobs = self.renderer.completion_logprobs(c.logprobs, start, self.as_ids)[0]
            if head is not None and head.logprobs is not None:
                logprobs = joined(head.logprobs, logprobs)
        text = "".join(c.text)
        return CompletionChoice(
            index=i,
            text=head.text + text if head else text,
            logprobs=logprobs,
            finish_reason=c.finish_reason,
        )

    # streaming ------------------------------------------------------------------------------

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.renderer.model_name,
            "choices": choices,
        }
        if self.req.include_usage:
            chunk["usage"] = None
        return chunk

    def _finish(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        """The chunk that finishes a choice: with ``proxytune`` where the request fell back."""
        chunk = self._chunk(choices)
        if self.extra is not None:
            chunk["proxytune"] = self.extra
        return chunk

    def opening_chunks(self) -> list[dict[str, Any]]:
        """Chat streams open with the assistant role for every choice."""
        if not self.chat:
            return []
        return [
            self._chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for i in range(len(self.choices))
        ]

    def step_chunks(self, updates: list[StepUpdate]) -> list[dict[str, Any]]:
        """Chunks for one decode step: text (and log-probs) per choice, then finish reasons."""
        self.add(updates)
        out = []
        r = self.renderer
        for u in updates:
            records = [u.logprob] if u.logprob is not None else []
            if self.chat:
                if u.delta or records:
                    logprobs = r.chat_logprobs(records, self.as_ids) if records else None
                    out.append(
                        self._chunk(
                            [
                                {
                                    "index": u.row,
                                    "delta": {"content": u.delta},
                                    "logprobs": logprobs.model_dump() if logprobs else None,
                                    "finish_reason": None,
                                }
                            ]
                        )
                    )
                if u.finish_reason is not None:
                    out.append(
                        self._finish(
                            [
                                {
                                    "index": u.row,
                                    "delta": {},
                                    "logprobs": None,
                                    "finish_reason": u.finish_reason,
                                }
                            ]
                        )
                    )
                continue
            if not (u.delta or records or u.finish_reason):
                continue
            logprobs = None
            if records:
                c = self.choices[u.row]
                lp, c.offset = r.completion_logprobs(records, c.offset, self.as_ids)
                logprobs = lp.model_dump()
            make = self._finish if u.finish_reason is not None else self._chunk
            out.append(
                make(
                    [
                        {
                            "index": u.row,
                            "text": u.delta,
                            "logprobs": logprobs,
                            "finish_reason": u.finish_reason,
                        }
                    ]
                )
            )
        return out

    def closing_chunks(self) -> list[dict[str, Any]]:
        """With ``stream_options.include_usage``: one last chunk, no choices, the usage."""
        if not self.req.include_usage:
            return []
        chunk = self._chunk([])
        chunk["usage"] = self.usage.model_dump()
        return [chunk]


# delivery -----------------------------------------------------------------------------------


async def stream_events(
    acc: Accumulator,
    events: asyncio.Queue[Any],
    job: Job,
    scheduler: Scheduler,
    metrics: Metrics,
    started: float,
    endpoint: str,
) -> AsyncIterator[str]:
    """Server-sent events: one ``data:`` line per chunk, then ``data: [DONE]``."""
    try:
        for chunk in acc.opening_chunks():
            yield sse(chunk)
        while True:
            event = await events.get()
            if isinstance(event, Finished):
                acc.finished = True
                if event.error is not None:
                    yield sse(failure(event.error).body())
                else:
                    for chunk in acc.closing_chunks():
                        yield sse(chunk)
                break
            if acc.first_token_at is None:
                acc.first_token_at = time.monotonic()
                metrics.ttft.observe(acc.first_token_at - started, endpoint=endpoint)
            for chunk in acc.step_chunks(event):
                yield sse(chunk)
        yield "data: [DONE]\n\n"
        metrics.latency.observe(time.monotonic() - started, endpoint=endpoint)
    finally:  # the client went away (or the server is stopping): stop its rows
        abandon(acc, job, scheduler, metrics)


def abandon(acc: Accumulator, job: Job, scheduler: Scheduler, metrics: Metrics) -> None:
    """Cancel ``job`` unless it finished (or was cancelled already). Runs when a stream ends,
    and again as the response's background task: a client that leaves before the first chunk
    closes a stream that never started, whose ``finally`` never runs."""
    if not acc.finished and not job.cancelled:
        scheduler.cancel(job)
        metrics.cancelled.inc()


async def collect_events(
    request: Request,
    acc: Accumulator,
    events: asyncio.Queue[Any],
    job: Job,
    scheduler: Scheduler,
    metrics: Metrics,
    started: float,
    endpoint: str,
) -> Response:
    """Wait for the whole answer, cancelling the job if the client disconnects first."""

    async def drain() -> Finished:
        while True:
            event = await events.get()
            if isinstance(event, Finished):
                return event
            if acc.first_token_at is None:
                acc.first_token_at = time.monotonic()
                metrics.ttft.observe(acc.first_token_at - started, endpoint=endpoint)
            acc.add(event)

    work = asyncio.ensure_future(drain())
    gone = asyncio.ensure_future(disconnected(request.receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled
        gone.cancel()
        abandoned = not work.done()
        if abandoned:
            work.cancel()
            scheduler.cancel(job)
            metrics.cancelled.inc()
    if abandoned:
        return Response(status_code=499)  # nobody is listening any more
    done = work.result()
    if done.error is not None:
        raise failure(done.error)
    metrics.latency.observe(time.monotonic() - started, endpoint=endpoint)
    return JSONResponse(acc.body())


async def disconnected(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def failure(err: BaseException) -> APIError:
    if isinstance(err, ShuttingDown):
        return APIError(str(err), 503, code="shutting_down")
    return APIError(
        f"generation failed: {type(err).__name__}: {err}", 500, code="generation_failed"
    )


def sse(payload: Any) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n"
