"""``proxytune serve``: the models behind an OpenAI-compatible API (needs the server extra)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import ConfigError
from ..extras import require
from ._app import app
from .options import EngineFlags, LoadOptions, ModelOptions, Opt, build_tuner, grouped

if TYPE_CHECKING:
    from ..server import ServerSettings


@dataclass(frozen=True)
class ServeOptions:
    """Where the server listens, who may call it, and its limits."""

    host: Annotated[str, Opt(help="Interface to bind (loopback unless told otherwise).")] = (
        "127.0.0.1"
    )
    port: Annotated[int, Opt(help="TCP port.")] = 8000
    allow_host: Annotated[
        list[str] | None,
        Opt(help="Another Host name to answer without an API key (repeatable; '*': any)."),
    ] = None
    api_key: Annotated[
        str | None,
        Opt(envvar="PROXYTUNE_API_KEY", help="Require 'Authorization: Bearer KEY' (not /health)."),
    ] = None
    served_model_name: Annotated[
        str | None, Opt(help="Model id for clients (default: the recipe or base name).")
    ] = None
    max_top_logprobs: Annotated[int, Opt(help="Cap on top_logprobs / logprobs.")] = 20
    max_batch_size: Annotated[int, Opt(help="Sequences decoded together.")] = 32
    max_queue: Annotated[int, Opt(help="Requests waiting before 429.")] = 64
    max_tokens: Annotated[int | None, Opt(help="Cap on a request's max_tokens.")] = None
    shutdown_timeout: Annotated[float, Opt(help="Seconds to finish in-flight work.")] = 30.0
    max_body_bytes: Annotated[
        int, Opt(help="Largest request body in bytes; larger ones get 413 before parsing.")
    ] = 4 * 1024 * 1024
    kl_metric: Annotated[
        bool, Opt("--kl-metric/--no-kl-metric", help="Measure the steering KL for /metrics.")
    ] = True

    def settings(
        self, operations: OperationsOptions, models: ModelOptions, trust_remote_code: bool
    ) -> ServerSettings:
        """The server's settings (checked), its model named after ``models`` unless
        ``--served-model-name`` names it."""
        # lazy: torch stays off the CLI's start (`proxytune --help` imports every command module)
        from ..server import ServerSettings
        from ..server.drift import parse_thresholds
        from ..server.gate import LOOPBACK_NAMES

        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be between 0 and 65535, got {self.port}")
        name, recipe = self.served_model_name, models.recipe
        if name is None:
            if recipe is None and models.base is not None:
                name = Path(models.base.rstrip("/")).name.removesuffix(".gguf")
            else:
                name = "default" if recipe in (None, "default") else Path(recipe).stem
        given = {f.name: getattr(g, f.name) for g in (self, operations) for f in fields(g)}
        same = {f.name: given[f.name] for f in fields(ServerSettings) if f.name in given}
        return ServerSettings(  # speculative: the tuner's engine options (--speculative)
            **same
            | {
                "model_name": name,
                "api_key": self.api_key or None,
                "allowed_hosts": (*LOOPBACK_NAMES, *(self.allow_host or ())),
                "model_roots": tuple(operations.model_root or ()),
                "trust_remote_code": trust_remote_code,
                "drift_thresholds": parse_thresholds(operations.drift_threshold or ()),
            }
        )


@dataclass(frozen=True)
class OperationsOptions:
    """How the running server behaves (docs/operations.md): its log, the pairs its admin API
    may load, a failing pair's fallback, steering drift, and its clients' connections."""

    log_level: Annotated[str, Opt(help="critical | error | warning | info | debug")] = "info"
    model_root: Annotated[
        list[str] | None,
        Opt(help="A directory the admin API may load pairs from (repeatable; needs --api-key)."),
    ] = None
    fallback: Annotated[
        str, Opt(help="When a pair fails mid-request: fail | base | expert (requests: 'fallback').")
    ] = "fail"
    drift_baseline: Annotated[
        str | None, Opt(help="A baseline from 'proxytune monitor baseline': alert on drift.")
    ] = None
    drift_threshold: Annotated[
        list[str] | None,
        Opt(help="Relative change that alerts: 0.5, or STAT=0.5 for kl|changed|entropy."),
    ] = None
    drift_window: Annotated[int, Opt(help="Steered tokens per pair in the drift window.")] = 512
    drift_min_tokens: Annotated[int, Opt(help="Tokens a window needs to alert.")] = 64
    allow_pickle: Annotated[
        bool, Opt(help="Let the admin API load pickled (.bin) weights (pickle can run code).")
    ] = False
    header_timeout: Annotated[
        float, Opt(help="Seconds a client has to send a request's headers; then 408.")
    ] = 10.0
    body_timeout: Annotated[
        float, Opt(help="Seconds a request's body has to arrive after its headers; then 408.")
    ] = 30.0
    max_client_connections: Annotated[
        int, Opt(help="Connections one client address may hold (0: no cap; raise behind a proxy).")
    ] = 128


@app.command()
@grouped
def serve(
    *,
    models: ModelOptions,
    load: LoadOptions,
    server: ServeOptions,
    engine: EngineFlags,
    operations: OperationsOptions,
) -> None:
    """Serve the models behind an OpenAI-compatible API (the embedded default if none given)."""
    for module in ("fastapi", "uvicorn"):  # before any model loads
        require(module, "server", "proxytune serve")
    overrides = engine.overrides()
    settings = server.settings(operations, models, load.trust_remote_code)
    # lazy: torch stays off the CLI's start (`proxytune --help` imports every command module)
    from ..server import serve as run_server

    tuner = build_tuner(models, load, engine=overrides)
    status = run_server(
        tuner, settings, host=server.host, port=server.port, log_level=operations.log_level
    )
    if status:  # the drain cut requests (server/shutdown.py: EXIT_CUT)
        raise typer.Exit(status)
