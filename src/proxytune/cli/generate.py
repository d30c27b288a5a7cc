"""``proxytune generate``: text from the proxy-tuned models (or each model alone, ``--compare``)."""

from __future__ import annotations

import json
import sys
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._app import app
from .batch import BatchJobOptions, run_batch_job
from .options import (
    BlackBoxOptions,
    LoadOptions,
    ModelOptions,
    Opt,
    PlainEngineFlags,
    SamplingOptions,
    SteeringOptions,
    build_tuner,
    grouped,
    prompt_formats,
)

if TYPE_CHECKING:
    from ..tuner import ProxyTuner


@app.command()
@grouped
def generate(
    *,
    prompts: Annotated[
        list[str] | None, typer.Argument(help="Prompts ('-' reads one from stdin).")
    ] = None,
    models: ModelOptions,
    load: LoadOptions,
    sampling: SamplingOptions,
    as_json: Annotated[
        bool, Opt("--json", help="One JSON object per result (with each model's prompt format).")
    ] = False,
    compare: Annotated[bool, Opt(help="Base alone, expert alone and proxy-tuned.")] = False,
    stream: Annotated[bool, Opt(help="Print text as it is generated.")] = False,
    steering: SteeringOptions,
    engine: PlainEngineFlags,
    blackbox: BlackBoxOptions,
    job: BatchJobOptions,
) -> None:
    """Generate text with proxy-tuning (the embedded default when no model is given)."""
    job.check(prompts)
    prompts = [sys.stdin.read() if p == "-" else p for p in prompts or ()]
    settings = sampling.settings()
    build = partial(
        build_tuner,
        models,
        load,
        engine=engine.overrides(),
        base_api=blackbox.api_spec(sampling.top_logprobs, models.base_prompt),
        cross_tokenizer=blackbox.cross_mode(),
        steering=steering,
    )
    if job.input_file is not None:
        run_batch_job(job, build, settings)
        return
    tuner = build()
    stats: Any = None
    if tuner.blackbox:  # an API base or a pair of another tokenizer: the bill
        # lazy: torch stays off the CLI's start (`proxytune --help` imports every command module)
        from ..engine.blackbox import BlackBoxStats

        stats = BlackBoxStats()
    elif tuner.options.speculative:
        # lazy: torch stays off the CLI's start (`proxytune --help` imports every command module)
        from ..engine.speculative import SpeculativeStats

        stats = SpeculativeStats()
    extra = {} if stats is None else {"stats": stats}
    if compare:
        _compare(tuner, prompts, settings, as_json, extra if tuner.options.speculative else {})
    else:
        _print(tuner, prompts, settings, extra, as_json, stream)
    if tuner.blackbox and not compare:
        print(f"black-box: {stats.summary()}", file=sys.stderr)
    elif tuner.options.speculative and stats is not None:
        print(
            f"speculative: {stats.accepted}/{stats.proposed} drafts accepted "
            f"({stats.acceptance_rate:.0%}), {stats.tokens_per_round:.2f} tokens per verification",
            file=sys.stderr,
        )


def _print(
    tuner: ProxyTuner,
    prompts: list[str],
    settings: dict[str, Any],
    extra: dict[str, Any],
    as_json: bool,
    stream: bool,
) -> None:
    """Each result's text (or as it is generated, ``--stream``), or one JSON object each."""
    if stream and not as_json:
        for p in prompts:
            deltas = (
                (u.delta for step in tuner.steps([p], **extra, **settings) for u in step)
                if extra
                else tuner.stream(p, **settings)
            )
            for delta in deltas:
                sys.stdout.write(delta)
                sys.stdout.flush()
            sys.stdout.write("\n")
        return
    formats = prompt_formats(tuner)
    for r in tuner.generate(prompts, **extra, **settings):
        if as_json:
            row = {"prompt": prompts[r.prompt_index], **r.to_dict(), "prompt_formats": formats}
            print(json.dumps(row))
        else:
            print(r.text)


def _run_systems(
    systems: dict[str, tuple[ProxyTuner, dict[str, str]]],
    prompts: list[str],
    settings: dict[str, Any],
    proxy_extra: dict[str, Any],
) -> dict[str, list[Any]]:
    """Each system's results, with live progress on stderr (tokens so far and tokens/s per
    system), so that stdout (a table or ``--json``) stays clean."""
    import time

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    rows = len(prompts) * int(settings.get("n") or 1)
    budget = rows * int(settings.get("max_new_tokens") or 0) or None
    columns = (
        TextColumn("{task.description:>6}"),
        BarColumn(),
        TextColumn("{task.completed:>5.0f} tokens  {task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    outputs: dict[str, list[Any]] = {}
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        for name, (system, _) in systems.items():
            task = progress.add_task(name, total=budget, rate="")
            started = time.perf_counter()
            count = 0

            def advance(updates: list[Any], task: Any = task, started: float = started) -> None:
                nonlocal count
                count += len(updates)
                rate = f"{count / max(time.perf_counter() - started, 1e-9):.1f} tok/s"
                progress.update(task, advance=len(updates), rate=rate)

            extra = proxy_extra if name == "proxy" else {}
            outputs[name] = system.generate(prompts, on_step=advance, **extra, **settings)
            progress.update(task, total=count, completed=count)
    return outputs


def _systems(tuner: ProxyTuner) -> dict[str, tuple[ProxyTuner, dict[str, str]]]:
    """``--compare``'s systems: each tuner, and the prompt format of each model it runs."""
    formats = prompt_formats(tuner)
    systems = {"base": (tuner.alone("base"), {"base": formats["base"]})}
    if tuner.pairs:
        first = tuner.pairs[0]
        role = (first.expert or first.anti_expert).role  # type: ignore[union-attr]
        systems["expert"] = (tuner.alone(role), {role: formats[role]})
    systems["proxy"] = (tuner, formats)
    return systems


def _compare(
    tuner: ProxyTuner,
    prompts: list[str],
    settings: dict[str, Any],
    as_json: bool,
    proxy_extra: dict[str, Any],
) -> None:
    """Each system on every prompt: a table, or one JSON object per prompt whose results carry
    the prompt formats of their models (``"prompt_formats": {"base": "raw", ...}``)."""
    systems = _systems(tuner)
    outputs = _run_systems(systems, prompts, settings, proxy_extra)
    if as_json:
        for i, p in enumerate(prompts):
            rows = {
                name: [
                    {**r.to_dict(), "prompt_formats": systems[name][1]}
                    for r in out
                    if r.prompt_index == i
                ]
                for name, out in outputs.items()
            }
            print(
                json.dumps(
                    {"prompt": p, **{k: v[0] if len(v) == 1 else v for k, v in rows.items()}}
                )
            )
        return
    from rich.console import Console
    from rich.table import Table

    caption = "prompt formats: " + ", ".join(
        f"{role} {fmt!r}" for role, fmt in prompt_formats(tuner).items()
    )
    table = Table("prompt", *systems, show_lines=True, caption=caption)
    for i, p in enumerate(prompts):
        table.add_row(
            p,
            *(
                "\n---\n".join(r.text for r in out if r.prompt_index == i)
                for out in outputs.values()
            ),
        )
    Console().print(table)
