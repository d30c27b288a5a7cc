"""``proxytune analyze``: per-token probabilities of every model, shifts, ranks and KL."""

from __future__ import annotations

from typing import Annotated

import typer

from ..evaluation.commands import read_prompts, run_analyze
from ._app import app
from .options import (
    LoadOptions,
    MaxNewTokensOption,
    ModelOptions,
    Opt,
    SeedOption,
    SteeringOptions,
    StopOption,
    TemperatureOption,
    build_tuner,
    grouped,
    sampling_settings,
)


@app.command()
@grouped
def analyze(
    *,
    prompts: Annotated[list[str] | None, typer.Argument(help="Prompts to generate from.")] = None,
    prompts_file: Annotated[
        str | None, Opt(help="More prompts: one per line, or a .jsonl of {prompt: ...}.")
    ] = None,
    models: ModelOptions,
    steering: SteeringOptions,
    load: LoadOptions,
    max_new_tokens: MaxNewTokensOption = None,
    temperature: TemperatureOption = None,
    seed: SeedOption = None,
    stop: StopOption = None,
    out: Annotated[str | None, Opt(help="Report folder (default runs/analysis).")] = None,
    top_tokens: Annotated[int, Opt(help="How many promoted tokens to list.")] = 20,
    min_count: Annotated[int, Opt(help="Only tokens generated at least this often.")] = 1,
    as_json: Annotated[bool, Opt("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Per-token probabilities of every model, shifts, ranks and KL: an HTML report and plots."""
    all_prompts = list(prompts or []) + (read_prompts(prompts_file) if prompts_file else [])
    tuner = build_tuner(models, load)
    raise typer.Exit(
        run_analyze(
            tuner,
            all_prompts,
            rule=steering.spec(tuner),
            out=out,
            top_tokens=top_tokens,
            min_count=min_count,
            settings=sampling_settings(
                max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop=stop
            ),
            as_json=as_json,
        )
    )
