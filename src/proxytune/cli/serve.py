"""``proxytune serve``: the models behind an OpenAI-compatible API (needs the server extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._app import app
from .options import (
    AlphaOption,
    AntiExpertOption,
    BackendOption,
    BaseOption,
    DeviceOption,
    DtypeOption,
    ExpertOption,
    GpuLayersOption,
    ModelOptions,
    OnePassOption,
    Opt,
    OverlapOption,
    PrefixCacheOption,
    PromptOption,
    RecipeOption,
    SpeculativeOption,
    StackedOption,
    ThreadsOption,
    TrustRemoteCodeOption,
    build_tuner,
    engine_overrides,
    parse_alphas,
)


@app.command()
def serve(
    recipe: RecipeOption = None,
    base: BaseOption = None,
    expert: ExpertOption = None,
    anti_expert: AntiExpertOption = None,
    alpha: AlphaOption = None,
    base_prompt: PromptOption = "auto",
    expert_prompt: PromptOption = "auto",
    anti_expert_prompt: PromptOption = "auto",
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    backend: BackendOption = None,
    threads: ThreadsOption = None,
    gpu_layers: GpuLayersOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    host: Annotated[str, Opt(help="Interface to bind (loopback unless told otherwise).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, Opt(help="TCP port.")] = 8000,
    allow_host: Annotated[
        list[str] | None,
        Opt(help="Another Host name to answer without an API key (repeatable; '*': any)."),
    ] = None,
    api_key: Annotated[
        str | None,
        Opt(envvar="PROXYTUNE_API_KEY", help="Require 'Authorization: Bearer KEY' (not /health)."),
    ] = None,
    served_model_name: Annotated[
        str | None, Opt(help="Model id for clients (default: the recipe or base name).")
    ] = None,
    max_top_logprobs: Annotated[int, Opt(help="Cap on top_logprobs / logprobs.")] = 20,
    max_batch_size: Annotated[int, Opt(help="Sequences decoded together.")] = 32,
    max_queue: Annotated[int, Opt(help="Requests waiting before 429.")] = 64,
    max_tokens: Annotated[int | None, Opt(help="Cap on a request's max_tokens.")] = None,
    shutdown_timeout: Annotated[float, Opt(help="Seconds to finish in-flight work.")] = 30.0,
    max_body_bytes: Annotated[
        int, Opt(help="Largest request body in bytes; larger ones get 413 before parsing.")
    ] = 4 * 1024 * 1024,
    kl_metric: Annotated[
        bool,
        Opt("--kl-metric/--no-kl-metric", help="Measure the steering KL for /metrics."),
    ] = True,
    overlap: OverlapOption = None,
    speculative: SpeculativeOption = None,
    stacked: StackedOption = None,
    prefix_cache: PrefixCacheOption = None,
    one_pass: OnePassOption = None,
    log_level: Annotated[str, Opt(help="critical | error | warning | info | debug")] = "info",
    model_root: Annotated[
        list[str] | None,
        Opt(help="A directory the admin API may load pairs from (repeatable; needs --api-key)."),
    ] = None,
    fallback: Annotated[
        str,
        Opt(help="When a pair fails mid-request: fail | base | expert (requests: 'fallback')."),
    ] = "fail",
    drift_baseline: Annotated[
        str | None, Opt(help="A baseline from 'proxytune monitor baseline': alert on drift.")
    ] = None,
    drift_threshold: Annotated[
        list[str] | None,
        Opt(help="Relative change that alerts: 0.5, or STAT=0.5 for kl|changed|entropy."),
    ] = None,
    drift_window: Annotated[int, Opt(help="Steered tokens per pair in the drift window.")] = 512,
    drift_min_tokens: Annotated[int, Opt(help="Tokens a window needs to alert.")] = 64,
    allow_pickle: Annotated[
        bool, Opt(help="Let the admin API load pickled (.bin) weights (pickle can run code).")
    ] = False,
    header_timeout: Annotated[
        float, Opt(help="Seconds a client has to send a request's headers; then 408.")
    ] = 10.0,
    body_timeout: Annotated[
        float, Opt(help="Seconds a request's body has to arrive after its headers; then 408.")
    ] = 30.0,
    max_client_connections: Annotated[
        int, Opt(help="Connections one client address may hold (0: no cap; raise behind a proxy).")
    ] = 128,
) -> None:
    """Serve the models behind an OpenAI-compatible API (the embedded default if none given)."""
    from ..extras import require

    for module in ("fastapi", "uvicorn"):  # before any model loads
        require(module, "server", "proxytune serve")
    engine = engine_overrides(
        overlap=overlap,
        speculative=speculative,
        stacked=stacked,
        prefix_cache=prefix_cache,
        one_pass=one_pass,
    )
    from ..errors import ConfigError
    from ..server import ServerSettings
    from ..server import serve as run_server
    from ..server.drift import parse_thresholds
    from ..server.gate import LOOPBACK_NAMES

    if not 0 <= port <= 65535:
        raise ConfigError(f"port must be between 0 and 65535, got {port}")
    if served_model_name is None:
        if recipe is None and base is not None:
            served_model_name = Path(base.rstrip("/")).name.removesuffix(".gguf")
        else:
            served_model_name = "default" if recipe in (None, "default") else Path(recipe).stem
    settings = ServerSettings(  # speculative: the tuner's engine options (--speculative)
        model_name=served_model_name,
        api_key=api_key or None,
        max_top_logprobs=max_top_logprobs,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        max_tokens=max_tokens,
        kl_metric=kl_metric,
        shutdown_timeout=shutdown_timeout,
        max_body_bytes=max_body_bytes,
        allowed_hosts=(*LOOPBACK_NAMES, *(allow_host or ())),
        model_roots=tuple(model_root or ()),
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        fallback=fallback,
        drift_baseline=drift_baseline,
        drift_thresholds=parse_thresholds(drift_threshold or ()),
        drift_window=drift_window,
        drift_min_tokens=drift_min_tokens,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        max_client_connections=max_client_connections,
    )
    tuner = build_tuner(
        ModelOptions(
            recipe=recipe,
            base=base,
            experts=tuple(expert or ()),
            anti_experts=tuple(anti_expert or ()),
            alphas=tuple(parse_alphas(alpha)),
            base_prompt=base_prompt,
            expert_prompt=expert_prompt,
            anti_expert_prompt=anti_expert_prompt,
            device=device,
            dtype=dtype,
            backend=backend,
            threads=threads,
            gpu_layers=gpu_layers,
            trust_remote_code=trust_remote_code,
            engine=engine,
        )
    )
    status = run_server(tuner, settings, host=host, port=port, log_level=log_level)
    if status:  # the drain cut requests (server/shutdown.py: EXIT_CUT)
        raise typer.Exit(status)
