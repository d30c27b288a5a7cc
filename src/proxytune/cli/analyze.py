"""``proxytune analyze``: per-token probabilities of every model, shifts, ranks and KL."""

from __future__ import annotations

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
    MaxNewTokensOption,
    ModelOptions,
    Opt,
    PromptOption,
    RecipeOption,
    RuleArgOption,
    RuleOption,
    SeedOption,
    StopOption,
    TemperatureOption,
    ThreadsOption,
    TrustRemoteCodeOption,
    build_tuner,
    parse_alphas,
    rule_spec,
    sampling_settings,
)


@app.command()
def analyze(
    prompts: Annotated[list[str] | None, typer.Argument(help="Prompts to generate from.")] = None,
    prompts_file: Annotated[
        str | None, Opt(help="More prompts: one per line, or a .jsonl of {prompt: ...}.")
    ] = None,
    recipe: RecipeOption = None,
    base: BaseOption = None,
    expert: ExpertOption = None,
    anti_expert: AntiExpertOption = None,
    alpha: AlphaOption = None,
    base_prompt: PromptOption = "auto",
    expert_prompt: PromptOption = "auto",
    anti_expert_prompt: PromptOption = "auto",
    rule: RuleOption = None,
    rule_arg: RuleArgOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    backend: BackendOption = None,
    threads: ThreadsOption = None,
    gpu_layers: GpuLayersOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
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
    from ..evaluation.commands import read_prompts, run_analyze

    all_prompts = list(prompts or []) + (read_prompts(prompts_file) if prompts_file else [])
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
        )
    )
    raise typer.Exit(
        run_analyze(
            tuner,
            all_prompts,
            rule=rule_spec(tuner, rule, rule_arg or ()),
            out=out,
            top_tokens=top_tokens,
            min_count=min_count,
            settings=sampling_settings(
                max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop=stop
            ),
            as_json=as_json,
        )
    )
