"""The FastAPI app: OpenAI-compatible routes in front of the scheduler.

>>> app = create_app(tuner, ServerSettings(model_name="my-model"))  # doctest: +SKIP
>>> serve(tuner, ServerSettings(), host="127.0.0.1", port=8000)      # doctest: +SKIP

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed
as server-sent events when ``stream`` is true), ``GET /health`` and ``GET /metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.fallback import check_policy
from ..engine.requests import Job
from ..errors import ConfigError, PromptTooLongError
from ..schedules import Constant
from .admin import add_admin_routes
from .drift import DriftMonitor, load_baseline
from .echo import Echo, check_echo, completion_prompts, echoes, prompt_logprobs
from .gate import LOOPBACK_NAMES, Gate
from .metrics import Metrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    parse_request,
)
from .render import Accumulator, Renderer, abandon, collect_events, failure, stream_events
from .scheduler import QueueFull, Scheduler, ShuttingDown

if TYPE_CHECKING:
    from ..tuner import ProxyTuner

log = logging.getLogger("proxytune.server")


@dataclass(frozen=True)
class ServerSettings:
    """How the server behaves; the models and their defaults come from the tuner."""

    model_name: str = "proxytune"
    """The id clients pass as ``model`` (``/v1/models`` lists it)."""
    api_key: str | None = None
    """Without a valid ``Authorization: Bearer`` key, every route but /health answers 401."""
    max_top_logprobs: int = 20
    max_batch_size: int = 32
    """Rows (prompts x n) decoded together; a request joins when its rows fit."""
    max_queue: int = 64
    """Requests waiting to join; more are answered 429 with Retry-After."""
    max_tokens: int | None = None
    """Upper bound on a request's max_tokens (None: only the context length bounds it)."""
    kl_metric: bool = True
    """Measure KL(steered || base) per steered token for /metrics (one extra softmax)."""
    shutdown_timeout: float = 30.0
    """Seconds in-flight requests get to finish on shutdown before they are cancelled."""
    retry_after: int = 1
    continuous: bool | None = None
    """Continuous batching (None: wherever the tuner decodes locally); False runs every
    request on the tuner's own loop, interleaved step by step (black-box bases always do)."""
    speculative: int | str | None = None
    """A draft length or ``"auto"``: every request is decoded speculatively (the expert
    drafts; exact output), on the tuner's own loop instead of continuous batching. Lowers a
    request's latency; at high concurrency continuous batching has the higher throughput."""
    max_body_bytes: int = 4 * 1024 * 1024
    """The largest request body read (bytes); larger ones are answered 413 before any parsing
    (parsing and validating costs a few hundred times the body's size in memory)."""
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES
    """``Host`` header names answered (port ignored) when there is no API key; others get 403,
    so that a web page that rebinds its DNS name to this machine cannot read answers. ``"*"``
    allows any; ``serve`` adds the interface it binds to."""
    model_roots: tuple[str, ...] = ()
    """Directories the admin API may load pairs from (``--model-root``); none: it loads none."""
    allow_pickle: bool = False
    """Let the admin API load pickled (``.bin``) weights."""
    trust_remote_code: bool = False
    """Let the admin API load models that run their own code."""
    fallback: str = "fail"
    """When a pair fails mid-request: ``fail`` it, or finish on the ``base`` or the ``expert``
    alone; requests may choose their own (``fallback``)."""
    drift_baseline: str | None = None
    """A baseline file (``proxytune monitor baseline``): alerts when steering drifts from it."""
    drift_thresholds: Mapping[str, float] | None = None
    """Per statistic (``kl``, ``changed``, ``entropy``): the relative change that alerts."""
    drift_window: int = 512
    """Steered tokens per pair the drift window holds."""
    drift_min_tokens: int = 64
    """Tokens a pair's window needs before it can alert."""
    header_timeout: float = 10.0
    """Seconds a client has to send a request's head, from connecting or from the previous
    response; then 408 and the connection closes (:mod:`.connections`, under :func:`serve`)."""
    body_timeout: float = 30.0
    """Seconds a request's body has to arrive once its head has; then 408 and closed."""
    max_client_connections: int = 128
    """Connections one client address may hold at once; one more gets 429 (0: no cap; behind
    a reverse proxy every client is the proxy)."""

    def __post_init__(self) -> None:
        integers = ("max_batch_size", "max_queue", "max_top_logprobs", "max_body_bytes")
        for name in (*integers, "max_client_connections"):
            value = getattr(self, name)
            least = 0 if name in ("max_top_logprobs", "max_client_connections") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(
                    f"{name.replace('_', '-')} must be an integer >= {least}, got {value!r}"
                )
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or self.max_tokens < 1
        ):
            raise ConfigError(f"max-tokens must be an integer >= 1, got {self.max_tokens!r}")
        check_policy(self.fallback, "fallback")
        if not self.shutdown_timeout >= 0:
            raise ConfigError(f"shutdown-timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        for name in ("header_timeout", "body_timeout"):
            value = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not 0 < value < math.inf:
                raise ConfigError(
                    f"{name.replace('_', '-')} must be a finite number of seconds > 0, "
                    f"got {value!r}"
                )


def create_app(tuner: ProxyTuner, settings: ServerSettings | None = None) -> FastAPI:
    """An app serving ``tuner``; its scheduler thread starts and stops with the app's lifespan.
    What the routes read is on ``app.state``: ``tuner``, ``settings``, ``scheduler``,
    ``metrics``, ``renderer``, ``drift``, ``pairs``, ``api_base`` (an API base's client)."""
    settings = settings or ServerSettings()
    metrics = Metrics()
    scheduler = Scheduler(
        tuner,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        kl=settings.kl_metric,
        metrics=metrics,
        continuous=settings.continuous,
        speculative=settings.speculative,
    )
    metrics.gauge(
        "proxytune_queue_depth",
        "Requests waiting to join the batch.",
        lambda: scheduler.queue_depth,
    )
    metrics.gauge(
        "proxytune_running_requests", "Requests in the running batch.", lambda: scheduler.running
    )
    metrics.gauge(
        "proxytune_running_rows", "Rows (prompts x n) in the running batch.", lambda: scheduler.rows
    )
    app = FastAPI(title="proxytune", lifespan=_lifespan, docs_url=None, redoc_url=None)
    state = app.state
    state.tuner, state.scheduler, state.metrics, state.settings = (
        tuner,
        scheduler,
        metrics,
        settings,
    )
    state.renderer = Renderer(tuner.tokenizer, settings.model_name)
    state.api_base = getattr(tuner.base.model, "client", None)  # an API base's EndpointClient
    app.add_middleware(
        Gate,  # type: ignore[arg-type]
        api_key=settings.api_key,
        metrics=metrics,
        allowed_hosts=settings.allowed_hosts,
    )
    state.drift = drift = DriftMonitor(
        load_baseline(settings.drift_baseline) if settings.drift_baseline else None,
        settings.drift_thresholds,
        settings.drift_window,
        settings.drift_min_tokens,
    )
    drift.register(metrics)
    scheduler.observers.append(lambda stats: drift.observe(stats.pairs))
    state.pairs = add_admin_routes(app, tuner, scheduler, settings, on_change=drift.reset)
    app.exception_handler(APIError)(_api_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.exception_handler(Exception)(_bug)
    state.created = int(time.time())
    app.get("/health")(health)
    app.get("/metrics")(prometheus)
    app.get("/v1/models")(models)
    app.get("/v1/models/{model_id:path}")(model)
    app.post("/v1/completions")(completions)
    app.post("/v1/chat/completions")(chat_completions)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    if state.api_base is not None:
        await run_in_threadpool(_probe, state.tuner.base.model)
    state.scheduler.start()
    yield
    await run_in_threadpool(state.scheduler.close, state.settings.shutdown_timeout)


# errors -------------------------------------------------------------------------------------


async def _api_error(request: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    message = "no such route" if err.status_code == 404 else str(err.detail)
    body = APIError(f"{message}: {request.method} {request.url.path}", err.status_code)
    return JSONResponse(body.body(), status_code=err.status_code)


async def _bug(request: Request, err: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    body = APIError(f"internal error: {type(err).__name__}: {err}", 500)
    return JSONResponse(body.body(), status_code=500)


def _busy(err: QueueFull | ShuttingDown, retry_after: int) -> APIError:
    if isinstance(err, QueueFull):
        return APIError(
            f"{err}; retry after {retry_after}s",
            429,
            code="queue_full",
            headers={"Retry-After": str(retry_after)},
        )
    return APIError(
        f"{err}; retry on another replica or later",
        503,
        code="shutting_down",
        headers={"Retry-After": str(retry_after * 5)},
    )


# routes -------------------------------------------------------------------------------------


async def health(request: Request) -> JSONResponse:
    state = request.app.state
    scheduler, settings = state.scheduler, state.settings
    ok = scheduler.alive and not scheduler.draining
    status = "ok" if ok else ("draining" if scheduler.draining else "worker stopped")
    body = {"status": status, "running": scheduler.running, "queued": scheduler.queue_depth}
    if settings.drift_baseline:
        body["drift"] = state.drift.health()
    if state.api_base is not None:
        body["base_api"] = state.api_base.describe()
    if ok:
        return JSONResponse(body)
    return JSONResponse(body, 503, headers={"Retry-After": str(settings.retry_after * 5)})


async def prometheus(request: Request) -> PlainTextResponse:
    metrics = request.app.state.metrics
    return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")


def _card(state: Any) -> ModelCard:
    """The served model as it is now (pairs change with the admin API)."""
    now = state.tuner.snapshot()
    contexts = [m.model.context_length for m in now.members if m.model.context_length]
    return ModelCard(
        id=state.settings.model_name,
        created=state.created,
        max_model_len=min(contexts) if contexts else None,
        pairs=len(now.pairs),
        default_alpha=[
            p.alpha.alpha if isinstance(p.alpha, Constant) else repr(p.alpha) for p in now.pairs
        ],
        rule=str(now.rule) if now.pairs else None,
    )


async def models(request: Request) -> dict[str, Any]:
    return ModelList(data=[_card(request.app.state)]).model_dump()


async def model(model_id: str, request: Request) -> dict[str, Any]:
    state = request.app.state
    if model_id != state.settings.model_name:
        raise _unknown_model(model_id, state.settings.model_name)
    return _card(state).model_dump()


async def completions(request: Request) -> Response:
    settings = request.app.state.settings
    req = parse_request(await read_body(request, settings.max_body_bytes), CompletionRequest)
    prompts = completion_prompts(req.prompt, request.app.state.tuner)
    top = req.logprobs
    _check_top(top, "logprobs", settings.max_top_logprobs)
    return await _generate(request, req, prompts, req.max_tokens, top, "prompt", chat=False)


async def chat_completions(request: Request) -> Response:
    settings = request.app.state.settings
    body = await read_body(request, settings.max_body_bytes)
    req = parse_request(body, ChatCompletionRequest)
    top = (req.top_logprobs or 0) if req.logprobs else None
    _check_top(top, "top_logprobs", settings.max_top_logprobs)
    return await _generate(request, req, [req.chat()], req.token_limit, top, "messages", True)


async def _generate(
    request: Request,
    req: CompletionRequest | ChatCompletionRequest,
    prompts: list[Any],
    max_tokens: int | None,
    top: int | None,
    prompt_field: str,
    chat: bool,
) -> Response:
    """Check, prepare and submit one request; its answer, streamed or whole."""
    started = time.monotonic()
    state = request.app.state
    tuner, scheduler, settings, metrics = (
        state.tuner,
        state.scheduler,
        state.settings,
        state.metrics,
    )
    if req.model is not None and req.model != settings.model_name:
        raise _unknown_model(req.model, settings.model_name)
    if len(prompts) * req.n > settings.max_batch_size:
        raise APIError(
            f"{len(prompts)} prompt(s) x n={req.n} is more than the {settings.max_batch_size} "
            "sequences this server decodes at once; lower n or send fewer prompts",
            param="n",
        )
    if max_tokens is not None and settings.max_tokens and max_tokens > settings.max_tokens:
        field = "max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens"
        raise APIError(
            f"{field} is {max_tokens}, more than this server's limit of {settings.max_tokens}",
            param=field,
        )
    budget = max_tokens or None  # 0 (echo alone) prepares one token that never runs
    if budget is None and settings.max_tokens:  # the default, within the server's cap
        budget = min(tuner.defaults.max_new_tokens, settings.max_tokens)
    job = await run_in_threadpool(_prepare, scheduler, tuner, req, prompts, budget, top)
    job.fallback = req.fallback or settings.fallback
    _check_room(job, max_tokens, prompt_field, chat and req.max_completion_tokens is not None)
    acc = Accumulator(job, state.renderer, chat, req, request_id=_request_id(chat))
    if not chat and req.echo:
        acc.echo = await _echo_of(state, req, job)
        if max_tokens == 0:
            for c in acc.choices:
                c.finish_reason = "length"
            return JSONResponse(acc.body())
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Any] = asyncio.Queue()

    def sink(event: Any) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    try:
        scheduler.submit(job, sink)
    except (QueueFull, ShuttingDown) as err:
        raise _busy(err, settings.retry_after) from None
    endpoint = request.url.path
    if req.stream:
        stream = stream_events(acc, events, job, scheduler, metrics, started, endpoint)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        cleanup = BackgroundTask(abandon, acc, job, scheduler, metrics)
        return StreamingResponse(
            stream, media_type="text/event-stream", headers=headers, background=cleanup
        )
    return await collect_events(request, acc, events, job, scheduler, metrics, started, endpoint)


async def _echo_of(state: Any, req: CompletionRequest, job: Job) -> list[Echo]:
    """What ``echo`` puts before each choice: the prompt, and with ``logprobs`` its
    tokens' log-probs (scored on the scheduler's thread, which drives the models)."""
    tuner, scheduler = state.tuner, state.scheduler
    check_echo(tuner, job.prepared)
    ids = job.rendered[job.prepared.base.role]
    records = None
    if req.logprobs is not None:
        fn = partial(
            prompt_logprobs,
            tuner,
            job.prompts,
            ids,
            req.logprobs,
            req.alpha,
            req.active_pairs,
            req.rule,
        )
        try:
            records = await asyncio.wrap_future(scheduler.call(fn))
        except (QueueFull, ShuttingDown) as err:
            raise _busy(err, state.settings.retry_after) from None
        except Exception as err:  # the models or the rule failed
            raise failure(err) from err
    return echoes(state.renderer, job.prompts, ids, records, bool(req.return_tokens_as_token_ids))


# request handling -----------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, or a 413 as soon as it is known to exceed ``limit`` bytes (from
    its Content-Length, else while it arrives): nothing larger is held or parsed."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(int(length), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(None, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int | None, limit: int) -> APIError:
    what = f"{size} bytes" if size is not None else "more"
    return APIError(
        f"the request body is {what}; this server takes at most {limit} bytes "
        "(the server's --max-body-bytes raises it)",
        413,
        code="request_too_large",
    )


def _unknown_model(name: str, served: str) -> APIError:
    return APIError(
        f"the model {name!r} does not exist; this server serves {served!r}",
        404,
        param="model",
        code="model_not_found",
    )


def _check_top(top: int | None, field: str, cap: int) -> None:
    if top is not None and top > cap:
        raise APIError(
            f"{field} is {top}, more than this server's limit of {cap} "
            "(the server's --max-top-logprobs raises it)",
            param=field,
        )


def _prepare(
    scheduler: Scheduler,
    tuner: ProxyTuner,
    req: Any,
    prompts: list[Any],
    max_tokens: int | None,
    top: int | None,
) -> Job:
    """Request -> validated, rendered job (in a worker thread: tokenizing can take a while)."""
    try:
        config = tuner.config(**req.generation(max_tokens, top))
        return scheduler.batch.prepare(prompts, config, req.alpha, req.active_pairs, req.rule)
    except PromptTooLongError as err:
        field = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        message = _hide_paths(str(err), tuner)
        raise APIError(message, param=field, code="context_length_exceeded") from None
    except ConfigError as err:
        raise APIError(_hide_paths(str(err), tuner), param=_field_of(err, req)) from None


def _field_of(err: ConfigError, req: Any) -> str | None:
    """The request field ``err`` is about: its ``param`` where that is one of the request's
    fields; a prompt's or message's problem is the request's prompt field."""
    if err.param is None:
        return None
    if err.param.startswith(("prompt", "message")):
        return "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    root = err.param.split("[", 1)[0].split(".", 1)[0]
    return err.param if root in type(req).model_fields else None


def _hide_paths(message: str, tuner: ProxyTuner) -> str:
    """Engine messages name models by path; clients need not see the server's file system."""
    for m in tuner.members:
        message = message.replace(f" ({m.model.name})", "")
    return message


def _check_room(job: Job, max_tokens: int | None, prompt_field: str, completion: bool) -> None:
    """An explicit max_tokens must fit in the context after every prompt."""
    if max_tokens is None:
        return
    for i, room in enumerate(job.rooms):
        if max_tokens > room:
            field = "max_completion_tokens" if completion else "max_tokens"
            where = f"{prompt_field}[{i}]" if len(job.rooms) > 1 else prompt_field
            raise APIError(
                f"{field} is {max_tokens}, but after the {where} ({job.prompt_tokens[i]} token(s)) "
                f"the model's context holds only {room} more tokens; lower {field} or shorten "
                "the prompt",
                param=field,
                code="context_length_exceeded",
            )


def _request_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


# running it -----------------------------------------------------------------------------------


def serve(
    tuner: ProxyTuner,
    settings: ServerSettings | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> int:
    """Serve ``tuner`` with uvicorn until SIGTERM/SIGINT, then drain in-flight work
    (``server/shutdown.py``). Returns the exit status: 0, or ``EXIT_CUT`` if work was cut."""
    import uvicorn

    # lazy: uvicorn only when serving (create_app alone does not need it)
    from .shutdown import run_draining

    settings = settings or ServerSettings()
    if host not in LOOPBACK_NAMES and not settings.api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    if host not in settings.allowed_hosts and host not in ("0.0.0.0", "::"):
        settings = replace(settings, allowed_hosts=(*settings.allowed_hosts, host))
    # every request would fail otherwise (a chat format on a model without a chat template);
    # an API base may come up later, so it is not run here
    tuner.check_ready(step=getattr(tuner.base.model, "client", None) is None)
    app = create_app(tuner, settings)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=connection_guard(settings)
    )
    return run_draining(config, app.state.scheduler, settings.shutdown_timeout)


def connection_guard(settings: ServerSettings) -> type[asyncio.Protocol]:
    """The HTTP protocol ``serve`` runs: uvicorn's h11 with ``settings``' read deadlines and
    per-client connection cap (:mod:`.connections`)."""
    # lazy: uvicorn only when serving (create_app alone does not need it)
    from .connections import guarded_protocol

    return guarded_protocol(
        settings.header_timeout, settings.body_timeout, settings.max_client_connections
    )


def _probe(model: Any) -> None:
    """Settle how an API base's prompts travel before serving (logged); a failure is logged
    and the first request finds out instead."""
    try:
        model.probe()
    except Exception as err:  # the endpoint may come up later
        log.warning("could not probe the API base %s: %s", model.name, err)
